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
* **aggregate**: ``mean``, the weighted sum ``sum_i w_i t_i`` over taking-part
  entries, divided, when ``normalize`` is on, by the sum of the taking-part
  weights (entries with nobody taking part stay 0); or one of the robust
  aggregates, which one input cannot drag far (see :func:`robust_aggregate`):
  ``trimmed_mean`` and ``median`` per entry, ``centered_clip`` per tensor.
  The result is scaled by ``lam``.

Before any of it, ``entry_clip`` (when set) bounds every input's entries by
that many times the tensor's robust scale: the median over inputs (weighted by
their merge weights) of each one's RMS over its nonzero entries. A delta that spends its whole norm on a
few weights is cut down there, where a norm screen would let it through.

How weights enter: they multiply task vectors in the sum and, with
``normalize``, in the divisor. They do not enter the sign vote unless
``weighted_vote`` is set (mergekit's behaviour: then the vote and the test of
agreement both use ``w_i t_i``, so a negative weight flips an input's side);
the TIES paper and peft vote on the unweighted values. With all weights 1 and ``normalize`` on, ``ties``
is peft's ``ties`` and mergekit's ``ties``.

Determinism: accumulation runs over inputs in the order given (callers sort
by id) with element-wise float32 operations only, so the result does not
depend on the thread count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from protocol import dare
from protocol.swarm_config import SwarmConfig

Sparsify = Literal["none", "magnitude", "dare"]
_CHUNK = (
    1 << 16
)  # elements per step of the element-wise passes: a chunk of every input stays in cache
Consensus = Literal["none", "sign"]
Aggregate = Literal["mean", "trimmed_mean", "median", "centered_clip"]


@dataclass(frozen=True)
class Method:
    """One registered merge method."""

    name: str
    sparsify: Sparsify
    consensus: Consensus
    default_normalize: bool  # mergekit's default for the same method name
    aggregate: Aggregate = "mean"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", "none", "none", default_normalize=True),
        Method("task_arithmetic", "none", "none", default_normalize=False),
        Method("ties", "magnitude", "sign", default_normalize=True),
        Method("dare_linear", "dare", "none", default_normalize=False),
        Method("dare_ties", "dare", "sign", default_normalize=False),
        Method("magnitude_prune", "magnitude", "none", default_normalize=False),
        # robust aggregates: always a (weighted) average of what is left, never a sum
        Method("trimmed_mean", "none", "none", default_normalize=True, aggregate="trimmed_mean"),
        Method("median", "none", "none", default_normalize=True, aggregate="median"),
        Method("centered_clip", "none", "none", default_normalize=True, aggregate="centered_clip"),
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
    :param seed: DARE mask seed; input ``i`` (in the engine's canonical order) uses ``seed + i``.
    :param entry_clip: bound each input's entries by this many times the tensor's robust
        scale (None: no bound).
    :param trim: ``trimmed_mean``: the fraction of inputs dropped at each end, per entry.
    :param clip_radius: ``centered_clip``: the radius, in medians of the inputs' distances
        from the centre.
    :param clip_iterations: ``centered_clip``: steps of moving the centre.
    """

    method: str
    lam: float = 1.0
    normalize: bool | None = None
    sign_method: Literal["total", "frequency"] = "total"
    weighted_vote: bool = False
    dare_rescale: Literal["inverse", "l1", "none"] = "inverse"
    seed: int = 0
    entry_clip: float | None = None
    trim: float = 0.2
    clip_radius: float = 1.0
    clip_iterations: int = 3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise ValueError(f"unknown merge method {self.method!r}; known: {known}")
        if self.entry_clip is not None and not self.entry_clip > 0:
            raise ValueError(f"entry_clip must be positive, not {self.entry_clip}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), not {self.trim}")
        if not self.clip_radius > 0 or self.clip_iterations < 1:
            raise ValueError("clip_radius must be positive and clip_iterations at least 1")

    @classmethod
    def for_swarm(cls, config: SwarmConfig) -> Recipe:
        """The recipe a swarm's aggregators merge with."""
        return cls(
            config.merge_method,
            lam=config.lam,
            sign_method=config.sign_method,
            entry_clip=config.entry_clip or None,
        )

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def normalized(self) -> bool:
        return self.spec.default_normalize if self.normalize is None else self.normalize


def magnitude_prune(x: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep the ``k = floor(density * numel)`` entries of largest |value|, zero the rest.

    Among entries whose magnitude equals the k-th largest, the lowest flat
    indices are kept. Zeros never count: if at most k entries are nonzero,
    nothing is trimmed. With ``inplace`` the result overwrites ``x``. Works
    in cache-sized chunks, so it allocates nothing of the tensor's size.
    """
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return x
    if not x.is_contiguous():  # the in-place passes below need one flat storage
        pruned = magnitude_prune(x.contiguous(), density, inplace=True)
        return x.copy_(pruned) if inplace else pruned
    out = x if inplace else x.clone()
    if k <= 0:
        return out.zero_()
    flat = out.view(-1)
    if torch.count_nonzero(flat).item() <= k:
        return out
    threshold = kth_largest_magnitude(flat, k)
    ties_left = k - sum(int(torch.count_nonzero(c.abs() > threshold)) for c in flat.split(_CHUNK))
    for c in flat.split(_CHUNK):  # zero what is below the threshold, and ties beyond the first ones
        mag = c.abs()
        keep = mag > threshold
        if ties_left > 0:
            at = torch.nonzero(mag == threshold).reshape(-1)[:ties_left]
            keep[at] = True
            ties_left -= at.numel()
        c.mul_(keep)
    return out


_SAMPLE = 1 << 14


def kth_largest_magnitude(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest |value| of a flat tensor (1 <= k <= numel).

    A strided sample brackets the answer between two magnitudes; only entries
    inside that band are ranked exactly. Falls back to a full selection when
    the bracket misses (the answer is exact either way; the sample is
    deterministic).
    """
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(flat.abs(), n - k + 1).values
    sample = flat[:: n // _SAMPLE].abs().sort().values  # ascending
    m = sample.numel()
    rank = (n - k) / n * m  # where the answer sits in the sample
    slack = 4 * (m**0.5) + 16
    lo = sample[max(int(rank - slack), 0)]
    hi = sample[min(int(rank + slack), m - 1)]
    above, band = 0, []
    for c in flat.split(_CHUNK):
        mag = c.abs()
        above += int(torch.count_nonzero(mag > hi))
        band.append(mag[(mag >= lo) & (mag <= hi) & (mag > 0)])  # k <= nonzeros: zeros never rank
    inside = torch.cat(band)
    del band
    if above < k <= above + inside.numel():
        return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(flat.abs(), n - k + 1).values


def dare_drop(
    x: torch.Tensor,
    density: float,
    seed: int,
    name: str,
    rescale: str = "inverse",
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (portable mask), then rescale survivors."""
    if density >= 1.0:
        return x
    if not x.is_contiguous():
        dropped = dare_drop(x.contiguous(), density, seed, name, rescale, inplace=True)
        return x.copy_(dropped) if inplace else dropped
    out = x if inplace else x.to(torch.float32, copy=True)
    flat = out.view(-1)
    before = _l1(flat) if rescale == "l1" else None
    for start, keep in dare.iter_keep_masks(seed, name, flat.numel(), 1.0 - density):
        flat[start : start + keep.size].mul_(
            torch.from_numpy(keep)
        )  # chunk by chunk: no big temporaries
    if rescale == "inverse":
        flat.mul_(float(dare.rescale_factor(1.0 - density)))
    elif rescale == "l1":
        after = _l1(flat)
        if before >= 1e-8 and after >= 1e-8:
            flat.mul_(before / after)
    return out


def _l1(flat: torch.Tensor) -> float:
    """Sum of |x| in a fixed order: chunks below torch's parallel-reduction size, in float64."""
    return sum(float(c.abs().sum(dtype=torch.float64)) for c in flat.split(16384))


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
    :param task_vectors: K float32 tensors of one shape, in a fixed order (sorted by
        input id); consumed one at a time and sparsified in place, so pass tensors
        the caller no longer needs (a generator keeps only one alive at a time).
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
            t = magnitude_prune(t, densities[i], inplace=True)
        elif spec.sparsify == "dare" and not pre[i]:
            t = dare_drop(t, densities[i], recipe.seed + i, name, recipe.dare_rescale, inplace=True)
        kept += torch.count_nonzero(t).item() / max(t.numel(), 1)
        tvs.append(t.reshape(-1))
    if not tvs or len(tvs) != len(weights):
        raise ValueError(f"tensor {name!r}: {len(tvs)} task vectors for {len(weights)} weights")
    if recipe.entry_clip is not None:
        clip_entries(tvs, recipe.entry_clip, weights)
    if spec.aggregate != "mean":
        merged = robust_aggregate(tvs, weights, recipe)
        if recipe.lam != 1.0:
            merged.mul_(recipe.lam)
        return merged.reshape(original_shape), TensorStats(kept / len(tvs), 0.0)
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


def lower_weighted_median(pairs: Iterable[tuple[float, float]]) -> float | None:
    """The lower weighted median of (value, weight) pairs; pairs without a positive weight do
    not count, and None means none has one."""
    items = sorted((v, w) for v, w in pairs if w > 0)
    half, acc = sum(w for _, w in items) / 2, 0.0
    for value, w in items:
        acc += w
        if acc >= half:
            return value
    return items[-1][0] if items else None


def robust_scale(tvs: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> float:
    """The weighted median over inputs of each one's RMS over its nonzero entries (0: all
    empty; weights: the inputs' merge weights, all 1 when None).

    Each input's RMS is taken over its nonzero entries, so DARE's dropped zeros do not
    shrink it; the median keeps one input from setting it, and weighing by merge weight
    keeps a crowd of inputs that weigh next to nothing (near-empty deltas that an
    aggregator with evaluation data weighs down) from dragging it to zero.
    """
    weights = weights if weights is not None else [1.0] * len(tvs)
    scales = []
    for t, w in zip(tvs, weights, strict=True):
        n = int(torch.count_nonzero(t))
        if n:
            scales.append((math.sqrt(float(t.double().square().sum()) / n), abs(w)))
    found = lower_weighted_median(scales)
    return 0.0 if found is None else found


def clip_entries(
    tvs: Sequence[torch.Tensor], factor: float, weights: Sequence[float] | None = None
) -> int:
    """Clamp, in place, every entry of every input to +-``factor`` x :func:`robust_scale`;
    returns how many entries were cut."""
    bound = factor * robust_scale(tvs, weights)
    cut = 0
    for t in tvs:
        cut += int(torch.count_nonzero(t.abs() > bound))
        t.clamp_(-bound, bound)
    return cut


def robust_aggregate(
    tvs: Sequence[torch.Tensor], weights: Sequence[float], recipe: Recipe
) -> torch.Tensor:
    """A robust average of K flat task vectors.

    Inputs enter as ``w_i t_i / mean(w)``, so with equal weights they are the task vectors
    themselves and a stale delta's discount still shrinks it.

    * ``trimmed_mean``: per entry, the mean of what is left after dropping the
      ``floor(trim K)`` smallest and largest values;
    * ``median``: per entry, the median (the mean of the two middle values for even K);
    * ``centered_clip`` (Karimireddy et al., 2021): starting from zero, the centre
      ``v`` moves ``clip_iterations`` times by the mean of ``clip(x_i - v)``, each
      difference scaled down to at most ``clip_radius`` times the median distance; the
      first step alone is the mean of per-tensor norm-clipped inputs.

    Per-entry statistics see DARE's zeros as values: on sparse deltas, where few inputs
    keep any one entry, ``median`` and ``trimmed_mean`` discard most of the signal.
    """
    mean_w = sum(weights) / len(weights)
    scale = [w / mean_w if abs(mean_w) >= 1e-8 else 1.0 for w in weights]
    k = len(tvs)
    if recipe.spec.aggregate == "centered_clip":
        centre = torch.zeros_like(tvs[0])
        for _ in range(recipe.clip_iterations):
            dists = [float((t * s - centre).norm()) for t, s in zip(tvs, scale, strict=True)]
            radius = recipe.clip_radius * statistics.median(dists)
            step = torch.zeros_like(centre)
            for t, s, d in zip(tvs, scale, dists, strict=True):
                step.add_(t * s - centre, alpha=min(1.0, radius / d) if d > 0 else 0.0)
            centre.add_(step, alpha=1.0 / k)
        return centre
    out = torch.empty_like(tvs[0])
    cut = int(recipe.trim * k) if recipe.spec.aggregate == "trimmed_mean" else 0
    for start in range(0, out.numel(), _CHUNK):
        stacked = torch.stack(
            [t[start : start + _CHUNK] * s for t, s in zip(tvs, scale, strict=True)]
        )
        ordered = stacked.sort(dim=0).values
        if recipe.spec.aggregate == "median":
            middle = ordered[(k - 1) // 2 : k // 2 + 1]  # one value for odd K, two for even
            out[start : start + _CHUNK] = middle.mean(dim=0)
        else:
            out[start : start + _CHUNK] = ordered[cut : k - cut].mean(dim=0)
    return out


def _combine(
    tvs: Sequence[torch.Tensor], weights: Sequence[float], recipe: Recipe
) -> tuple[torch.Tensor, int]:
    """Consensus and aggregation over one chunk; returns (merged chunk, disagreeing entries)."""
    if recipe.spec.consensus != "sign":
        num = torch.zeros_like(tvs[0])
        for t, w in zip(tvs, weights, strict=True):
            num.add_(t, alpha=w)
        if recipe.normalized:
            total = sum(weights)
            num.div_(total if abs(total) >= 1e-8 else 1.0)  # mergekit's guard
        return (num.mul_(recipe.lam) if recipe.lam != 1.0 else num), 0
    weighted = recipe.weighted_vote
    voters = [t * w for t, w in zip(tvs, weights, strict=True)] if weighted else tvs
    elected = elect_sign(voters, recipe.sign_method)
    # v * elected > 0 exactly where v is nonzero and agrees; < 0 where it disagrees. With a
    # weighted vote, agreement is judged on w * t (mergekit), so a negative weight flips it.
    mass = torch.zeros_like(tvs[0])  # sum of w * t over agreeing entries, times the elected sign
    den = torch.zeros_like(tvs[0])
    disagree = torch.zeros(tvs[0].shape, dtype=torch.bool)
    for v, w in zip(voters, weights, strict=True):
        aligned = v * elected
        disagree |= aligned < 0
        agree = aligned > 0
        mass.add_(aligned.clamp_(min=0), alpha=1.0 if weighted else w)
        den.add_(agree, alpha=w)
    merged = mass.mul_(elected)
    if recipe.normalized:
        merged.div_(den.masked_fill_(den == 0, 1.0))
    if recipe.lam != 1.0:
        merged.mul_(recipe.lam)
    return merged, int(disagree.sum())
