"""Robust aggregates and the per-entry bound, against plain reference computations."""

from __future__ import annotations

import pytest
import torch

from aggregator.methods import Recipe, clip_entries, merge_tensor, robust_scale


def tvs(k: int, shape=(41, 29), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.01 for _ in range(k)]


def merge(method, vectors, weights=None, **kw):
    weights = weights or [1.0] * len(vectors)
    vectors = [v.clone() for v in vectors]
    merged, _ = merge_tensor("t", vectors, weights, [1.0] * len(vectors), Recipe(method, **kw))
    return merged


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_is_torch_median_of_middle_values(k):
    vectors = tvs(k, seed=k)
    ordered = torch.stack(vectors).sort(dim=0).values
    want = ordered[(k - 1) // 2 : k // 2 + 1].mean(dim=0)
    torch.testing.assert_close(merge("median", vectors), want)


@pytest.mark.parametrize(("k", "trim"), [(5, 0.2), (10, 0.1), (10, 0.3), (3, 0.0)])
def test_trimmed_mean_drops_floor_trim_k_at_each_end(k, trim):
    vectors = tvs(k, seed=k)
    cut = int(trim * k)
    ordered = torch.stack(vectors).sort(dim=0).values
    want = ordered[cut : k - cut].mean(dim=0)
    torch.testing.assert_close(merge("trimmed_mean", vectors, trim=trim), want)


def test_one_huge_input_cannot_move_the_median_or_trimmed_mean_far():
    honest = tvs(4, seed=1)
    attacker = torch.full_like(honest[0], 1e6)
    clean = torch.stack(honest).mean(dim=0)
    for method in ("median", "trimmed_mean"):
        merged = merge(method, [*honest, attacker], trim=0.2)
        assert float(merged.abs().max()) < 0.1, method  # honest values are ~0.01
        assert float((merged - clean).norm()) < float(clean.norm()) * 2


def test_centered_clip_with_one_iteration_averages_norm_clipped_inputs():
    vectors = tvs(5, seed=3)
    vectors[0] = vectors[0] * 100
    norms = [float(v.norm()) for v in vectors]
    radius = 0.5 * sorted(norms)[2]
    want = sum(v * min(1.0, radius / n) for v, n in zip(vectors, norms, strict=True)) / 5
    got = merge("centered_clip", vectors, clip_radius=0.5, clip_iterations=1)
    torch.testing.assert_close(got, want)


def test_centered_clip_bounds_a_far_input_to_the_radius():
    honest = tvs(4, seed=4)
    clean = torch.stack(honest).mean(dim=0)
    far = -clean / clean.norm() * 1e4
    merged = merge("centered_clip", [*honest, far])
    # one input in five moves the centre by at most radius / 5 per step
    radius = max(float(h.norm()) for h in honest)
    assert float((merged - clean).norm()) < 3 * radius


def test_robust_aggregates_scale_inputs_by_their_weights():
    vectors = tvs(3, seed=5)
    weights = [1.0, 1.0, 0.5]
    scaled = [v * w / (2.5 / 3) for v, w in zip(vectors, weights, strict=True)]
    torch.testing.assert_close(merge("median", vectors, weights), merge("median", scaled))


def test_lambda_scales_a_robust_aggregate():
    vectors = tvs(3, seed=6)
    torch.testing.assert_close(merge("median", vectors, lam=0.5), merge("median", vectors) * 0.5)


def test_robust_scale_ignores_zeros_and_one_input():
    a = torch.zeros(100)
    a[:10] = 2.0  # RMS over nonzeros: 2, whatever the zeros
    b = torch.full((100,), 1.0)
    c = torch.full((100,), 1e9)
    assert robust_scale([a, b, c]) == pytest.approx(2.0)
    assert robust_scale([torch.zeros(5)]) == 0.0


def test_entry_clip_cuts_a_spike_and_leaves_honest_entries():
    honest = tvs(4, seed=7)
    spike = torch.zeros_like(honest[0])
    spike[3, 5] = -62.0  # the whole norm budget on one weight
    vectors = [*honest, spike]
    bound = 8 * robust_scale(vectors)
    cut = clip_entries(vectors, 8.0)
    assert cut >= 1
    assert float(vectors[4].abs().max()) == pytest.approx(bound)
    merged = merge("linear", [*honest, spike], entry_clip=8.0)
    assert float(merged.abs().max()) < 0.1
    untouched = merge("linear", honest, entry_clip=8.0)  # Gaussian entries stay under 8 RMS
    torch.testing.assert_close(untouched, torch.stack(honest).mean(dim=0))


def test_recipe_refuses_bad_robust_options():
    for kw in ({"entry_clip": 0.0}, {"trim": 0.5}, {"clip_radius": 0}, {"clip_iterations": 0}):
        with pytest.raises(ValueError):
            Recipe("median", **kw)


def test_robust_scale_follows_the_inputs_that_weigh():
    honest = [torch.full((100,), 1.0) for _ in range(2)]
    crowd = [torch.full((100,), 1e-6) for _ in range(8)]  # near-empty, weighed down
    assert robust_scale([*honest, *crowd]) == pytest.approx(1e-6)
    weights = [1.0, 1.0] + [0.01] * 8
    assert robust_scale([*honest, *crowd], weights) == pytest.approx(1.0)
