"""The outer optimizer: a round's merged delta is an outer gradient, applied to the head.

``none`` moves the head by the merged delta itself: ``base_{t+1} = base_t + D_t``.
``nesterov`` is DiLoCo's outer step (Douillard et al. 2023, arXiv 2311.08105), in float32::

    m_t        = mu * m_{t-1} + D_t                 (m_0 = 0: the first outer step)
    base_{t+1} = base_t + lr_t * (D_t + mu * m_t)

with ``lr_t`` ramped linearly from ``lr / warmup`` to ``lr`` over the first ``warmup``
rounds (0: no ramp). The momentum is chain state, carried from head to head as a
blob (protocol.momentum), so whichever aggregator merges round t+1 steps from the
same m_t and the head's base id does not depend on who made it.

Stale deltas (trained on an ancestor within ``staleness`` rounds) are folded into
``D_t`` with their staleness discount before the round's single outer step: the
momentum sees one gradient per round, however late its parts arrived. Async
Local-SGD (Liu et al. 2024, arXiv 2401.09135) found that stepping momentum once per
late update breaks training and that a delayed Nesterov step, applied once per
batch of updates, fixes it; one step per round is that batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class OuterStep:
    """One round's outer step.

    :param lr: the outer learning rate of this round (after warm-up).
    :param momentum: mu, the momentum factor.
    :param previous: the parent head's momentum file; None for the chain's first step (zeros).
    :param out: where this round's momentum file is written.
    """

    lr: float
    momentum: float
    previous: Path | None
    out: Path

    def apply(
        self, delta: torch.Tensor, previous: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the update to add to the base, the new momentum), both float32; ``delta`` is
        the round's merged delta of one tensor, ``previous`` its momentum (None: zeros)."""
        return nesterov_step(delta, previous, self.lr, self.momentum)


def nesterov_step(
    delta: torch.Tensor, previous: torch.Tensor | None, lr: float, mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nesterov's outer step in float32: (lr * (D + mu * m), m) with m = mu * m_prev + D."""
    delta = delta.to(torch.float32)
    m = delta.clone() if previous is None else previous.to(torch.float32).mul(mu).add_(delta)
    update = torch.add(delta, m, alpha=mu).mul_(lr)
    return update, m


def outer_lr(lr: float, warmup: int, round_: int) -> float:
    """The outer learning rate of ``round_`` (1 for the first merge after genesis)."""
    if warmup <= 0 or round_ >= warmup:
        return lr
    return lr * round_ / warmup
