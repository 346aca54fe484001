"""Merge methods: pure functions from K task vectors of one tensor to one merged delta.

A method is a row of ``METHODS``, composed from three choices (as in the
papers, and as mergekit composes them):

* **sparsify** each task vector: ``none``; ``magnitude`` (keep the top
  ``density`` fraction by |value|, see :func:`magnitude_prune`); or ``dare``
  (keep each entry with probability ``density`` using the portable mask of
  ``protocol.dare`` and rescale survivors, see :func:`dare_drop`). Inputs
  that are already DARE-sparse (``.msd`` deltas) are not dropped again.
* **consensus**: ``none``, or ``sign``: elect a sign per entry, by total mass
  (sum of the sparsified values) or by frequency (sum of their signs); a zero
  total elects +. Only entries whose sign equals the elected one take part;
  zeros never do.
* **aggregate**: the weighted sum ``sum_i w_i t_i`` over taking-part entries,
  divided, when ``normalize`` is on, by the sum of the taking-part weights
  (entries with nobody taking part stay 0). The result is scaled by ``lam``.

How weights enter: they multiply task vectors in the sum and, with
``normalize``, in the divisor. They do not enter the sign vote unless
``weighted_vote`` is set (mergekit's behaviour; the TIES paper and peft vote
on the unweighted values). With all weights 1 and ``normalize`` on, ``ties``
is peft's ``ties`` and mergekit's ``ties``.

Determinism: accumulation runs over inputs in the order given (callers sort
by id) with element-wise float32 operations only, so the result does not
depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from protocol import dare

Sparsify = Literal["none", "magnitude", "dare"]
Consensus = Literal["none", "sign"]


@dataclass(frozen=True)
class Method:
    """One registered merge method."""

    name: str
    sparsify: Sparsify
    consensus: Consensus
    default_normalize: bool  # mergekit's default for the same method name


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", "none", "none", default_normalize=True),
        Method("task_arithmetic", "none", "none", default_normalize=False),
        Method("ties", "magnitude", "sign", default_normalize=True),
        Method("dare_linear", "dare", "none", default_normalize=False),
        Method("dare_ties", "dare", "sign", default_normalize=False),
        Method("magnitude_prune", "magnitude", "none", default_normalize=False),
    )
}


@dataclass(frozen=True)
class Recipe:
    """A method and its global options.

    :param method: a key of ``METHODS``.
    :param lam: lambda, scales the merged delta.
    :param normalize: divide by the (agreeing) weights; ``None`` takes the method's default.
    :param sign_method: ``"total"`` (TIES: by mass) or ``"frequency"`` (by count).
    :param weighted_vote: weights enter the sign vote (mergekit) or not (paper, peft).
    :param dare_rescale: ``"inverse"`` (survivors x 1/density, the paper) or ``"l1"``
        (restore each task vector's L1 norm, mergekit's ``rescale``), or ``"none"``.
    :param seed: DARE mask seed; input ``i`` uses ``seed + i``.
    """

    method: str
    lam: float = 1.0
    normalize: bool | None = None
    sign_method: Literal["total", "frequency"] = "total"
    weighted_vote: bool = False
    dare_rescale: Literal["inverse", "l1", "none"] = "inverse"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ValueError(f"unknown merge method {self.method!r}; known: {known}")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def normalized(self) -> bool:
        return self.spec.default_normalize if self.normalize is None else self.normalize


def magnitude_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = floor(density * numel)`` entries of largest |value|, zero the rest.

    Among entries whose magnitude equals the k-th largest, the lowest flat
    indices are kept. Zeros never count: if at most k entries are nonzero,
    nothing is trimmed.
    """
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    flat = x.reshape(-1)
    mag = flat.abs()
    if torch.count_nonzero(mag).item() <= k:
        return x
    threshold = kth_largest(mag, k)
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(mag == threshold).reshape(-1)[:missing]
        keep[ties] = True
    return (flat * keep).reshape(x.shape)


_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of a flat tensor (1 <= k <= numel).

    A strided sample brackets the answer between two values; only the entries
    inside that band are ranked exactly, which on large tensors is several
    times faster than a full selection. Falls back to one when the bracket
    misses (the answer is exact either way, and the sample is deterministic).
    """
    n = values.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: n // _SAMPLE].sort().values  # ascending
    m = sample.numel()
    rank = (n - k) / n * m  # where the answer sits in the sample
    slack = 4 * (m**0.5) + 16
    lo = sample[max(int(rank - slack), 0)]
    hi = sample[min(int(rank + slack), m - 1)]
    above = int(torch.count_nonzero(values > hi))
    band = values[(values >= lo) & (values <= hi)]
    if above < k <= above + band.numel():
        return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


def dare_drop(
    x: torch.Tensor, density: float, seed: int, name: str, rescale: str = "inverse"
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (portable mask), then rescale survivors."""
    if density >= 1.0:
        return x
    flat = x.reshape(-1).to(torch.float32)
    mask = torch.from_numpy(dare.keep_mask(seed, name, flat.numel(), 1.0 - density))
    kept = flat * mask
    if rescale == "inverse":
        kept = kept * float(dare.rescale_factor(1.0 - density))
    elif rescale == "l1":
        before, after = flat.abs().sum(), kept.abs().sum()
        if before >= 1e-8 and after >= 1e-8:
            kept = kept * (before / after)
    return kept.reshape(x.shape)


def elect_sign(tvs: Sequence[torch.Tensor], method: str) -> torch.Tensor:
    """+1 or -1 per entry: the sign of the sum of values (total) or of signs (frequency)."""
    acc = torch.zeros_like(tvs[0])
    for t in tvs:
        acc += t if method == "total" else torch.sign(t)
    return torch.where(acc >= 0, 1.0, -1.0)


@dataclass
class TensorStats:
    """What one tensor's merge did, for the merge report."""

    kept_fraction: float  # mean over inputs of the fraction of entries left after sparsifying
    conflict_rate: (
        float  # fraction of entries where some nonzero input disagrees with the elected sign
    )


def merge_tensor(
    name: str,
    task_vectors: Iterable[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    recipe: Recipe,
    *,
    presparsified: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, TensorStats]:
    """Merge K float32 task vectors of one tensor into one float32 delta.

    :param name: the tensor's name (seeds its DARE masks).
    :param task_vectors: K tensors of one shape, in a fixed order (sorted by input id);
        consumed one at a time, so a generator keeps only sparsified copies alive.
    :param weights: one weight per input.
    :param densities: one density per input (magnitude keep fraction or DARE keep rate).
    :param presparsified: inputs already DARE-sparse, which ``dare`` leaves as they are.
    """
    spec = recipe.spec
    pre = presparsified or [False] * len(weights)
    tvs: list[torch.Tensor] = []
    kept = 0.0
    original_shape: torch.Size | None = None
    for i, t in enumerate(task_vectors):
        original_shape = t.shape
        t = t.to(torch.float32)
        if spec.sparsify == "magnitude":
            t = magnitude_prune(t, densities[i])
        elif spec.sparsify == "dare" and not pre[i]:
            t = dare_drop(t, densities[i], recipe.seed + i, name, recipe.dare_rescale)
        kept += torch.count_nonzero(t).item() / max(t.numel(), 1)
        tvs.append(t.reshape(-1))
    if not tvs or len(tvs) != len(weights):
        raise ValueError(f"tensor {name!r}: {len(tvs)} task vectors for {len(weights)} weights")
    shape = tvs[0].shape  # flat
    merged = torch.empty(shape, dtype=torch.float32)
    conflicts = 0
    for start in range(0, shape[0], _CHUNK):  # bounded temporaries, whatever the tensor size
        chunk = [t[start : start + _CHUNK] for t in tvs]
        out, disagree = _combine(chunk, weights, recipe)
        merged[start : start + _CHUNK] = out
        conflicts += disagree
    stats = TensorStats(kept / len(tvs), conflicts / shape[0] if shape[0] else 0.0)
    return merged.reshape(original_shape), stats


_CHUNK = 1 << 20


def _combine(
    tvs: Sequence[torch.Tensor], weights: Sequence[float], recipe: Recipe
) -> tuple[torch.Tensor, int]:
    """Consensus and aggregation over one chunk; returns (merged chunk, disagreeing entries)."""
    num = torch.zeros_like(tvs[0])
    den = torch.zeros_like(tvs[0])
    disagreeing = 0
    if recipe.spec.consensus == "sign":
        voters = [t * w for t, w in zip(tvs, weights, strict=True)] if recipe.weighted_vote else tvs
        elected = elect_sign(voters, recipe.sign_method)
        disagree = torch.zeros(tvs[0].shape, dtype=torch.bool)
        for t, w in zip(tvs, weights, strict=True):
            sign = torch.sign(t)
            agree = sign == elected
            disagree |= (sign != 0) & ~agree
            num += torch.where(agree, t * w, 0.0)
            den += agree * w
        disagreeing = int(disagree.sum())
    else:
        for t, w in zip(tvs, weights, strict=True):
            num += t * w
            den += w
    merged = num / torch.where(den == 0, 1.0, den) if recipe.normalized else num
    if recipe.lam != 1.0:
        merged *= recipe.lam
    return merged, disagreeing
