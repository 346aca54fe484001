"""Merge methods against huggingface peft's merge_utils (a test-only oracle)."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft.utils import merge_utils as peft

from aggregator.methods import Recipe, dare_drop, magnitude_prune, merge_tensor
from protocol import dare


def tvs(k: int, shape=(37, 23), seed=0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 0.01).to(dtype).float() for _ in range(k)]


def ours(method, vectors, weights, density=1.0, **kw):
    merged, _ = merge_tensor("t", vectors, weights, [density] * len(vectors), Recipe(method, **kw))
    return merged


@pytest.mark.parametrize("k", [1, 2, 5])
def test_task_arithmetic_matches_peft(k):
    vectors, weights = tvs(k), [0.5 + i for i in range(k)]
    want = peft.task_arithmetic(vectors, torch.tensor(weights))
    torch.testing.assert_close(
        ours("task_arithmetic", vectors, weights), want, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("k", "density", "sign"), itertools.product([1, 3, 6], [0.2, 0.5, 1.0], ["total", "frequency"])
)
def test_ties_matches_peft_with_unit_weights(k, density, sign):
    vectors = tvs(k, seed=k)
    want = peft.ties(vectors, torch.ones(k), density, majority_sign_method=sign)
    got = ours("ties", vectors, [1.0] * k, density, sign_method=sign)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def distinct_magnitudes(k: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Task vectors exactly representable in ``dtype`` with no two equal magnitudes.

    torch.topk (peft's trim) breaks magnitude ties arbitrarily, so agreement is
    only defined where no tie straddles the threshold.
    """
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(600)
    mags = (
        (128 + i % 128) / 128 * 2.0 ** (i // 128 - 12)
    )  # 8 significant bits: exact in bf16 and fp16
    out = []
    for _ in range(k):
        signs = torch.randint(0, 2, (600,), generator=g) * 2 - 1
        out.append(
            (mags[torch.randperm(600, generator=g)] * signs).reshape(20, 30).to(dtype).float()
        )
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_matches_peft_on_low_precision_task_vectors(dtype):
    vectors = distinct_magnitudes(4, dtype, seed=9)
    want = peft.ties(vectors, torch.ones(4), 0.3)
    torch.testing.assert_close(ours("ties", vectors, [1.0] * 4, 0.3), want, rtol=1e-6, atol=1e-8)


def _with_our_dare_mask(monkeypatch):
    """Make peft's random pruning use our portable mask, input by input."""
    calls = itertools.count()

    def pruning(tensor, density, rescale):
        return dare_drop(tensor, density, next(calls), "t", "inverse" if rescale else "none")

    monkeypatch.setattr(peft, "random_pruning", pruning)


@pytest.mark.parametrize("k", [1, 3])
def test_dare_linear_matches_peft_given_the_same_mask(monkeypatch, k):
    _with_our_dare_mask(monkeypatch)
    vectors, weights = tvs(k, seed=2), [1.0 + i for i in range(k)]
    want = peft.dare_linear(vectors, torch.tensor(weights), 0.3)
    torch.testing.assert_close(
        ours("dare_linear", vectors, weights, 0.3), want, rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("k", [1, 4])
def test_dare_ties_matches_peft_given_the_same_mask(monkeypatch, k):
    _with_our_dare_mask(monkeypatch)
    vectors = tvs(k, seed=3)
    want = peft.dare_ties(vectors, torch.ones(k), 0.3)
    got = ours("dare_ties", vectors, [1.0] * k, 0.3, normalize=True)  # peft takes the mean
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_edge_cases_match_peft():
    zeros = [torch.zeros(10, 10) for _ in range(3)]
    torch.testing.assert_close(
        ours("ties", zeros, [1.0] * 3, 0.2), peft.ties(zeros, torch.ones(3), 0.2)
    )
    # Every sign disagrees: +x, -x, +x, -x -> totals are 0 -> + is elected.
    x = torch.rand(8, 8) + 0.1
    opposed = [x, -x, x, -x]
    want = peft.ties(opposed, torch.ones(4), 1.0)
    torch.testing.assert_close(ours("ties", opposed, [1.0] * 4, 1.0), want)
    torch.testing.assert_close(want, x)


def test_magnitude_ties_keep_the_lowest_indices():
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5])
    # k = 3: 3 is kept, then two of the three 2s (indices 2 and 3 come before 4).
    assert magnitude_prune(x, 0.5).tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0]
    assert magnitude_prune(x, 1.0).tolist() == x.tolist()
    assert magnitude_prune(x, 0.1).tolist() == [0.0] * 6
    sparse = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert magnitude_prune(sparse, 0.5).tolist() == sparse.tolist()  # fewer nonzeros than k


def test_exact_magnitude_ties_agree_with_peft_when_the_threshold_does_not_split_them():
    x = torch.tensor([[3.0, -1.0, -3.0, 1.0], [-1.0, 3.0, 1.0, -3.0]])
    ys = [x, -x.flip(1)]
    want = peft.ties(ys, torch.ones(2), 0.5)  # k = 4: exactly the four 3s
    torch.testing.assert_close(ours("ties", ys, [1.0, 1.0], 0.5), want)


def test_linear_is_the_weighted_mean_and_lambda_scales():
    a, b = torch.ones(3), 3 * torch.ones(3)
    assert ours("linear", [a, b], [1.0, 3.0]).tolist() == [2.5] * 3
    assert ours("task_arithmetic", [a, b], [1.0, 1.0], lam=0.5).tolist() == [2.0] * 3


def test_weights_enter_the_sign_vote_only_when_asked():
    a, b = torch.tensor([1.0]), torch.tensor([-2.0])
    # unweighted: total -1 -> "-" wins, b alone. Weighted (10 * 1 vs -2): "+" wins, a alone.
    assert ours("ties", [a, b], [10.0, 1.0]).tolist() == [-2.0]
    assert ours("ties", [a, b], [10.0, 1.0], weighted_vote=True).tolist() == [1.0]


def test_dare_drop_uses_the_protocol_mask_and_rescales():
    x = torch.arange(1.0, 101.0)
    got = dare_drop(x, 0.25, 7, "w")
    mask = torch.from_numpy(dare.keep_mask(7, "w", 100, 0.75))
    torch.testing.assert_close(got, x * mask * 4.0)
    l1 = dare_drop(x, 0.25, 7, "w", "l1")
    torch.testing.assert_close(l1.abs().sum(), x.abs().sum())


def test_merge_reports_conflicts_and_kept_fraction():
    a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([-1.0, 2.0, 0.0, 0.0])
    _, stats = merge_tensor("t", [a, b], [1.0, 1.0], [1.0, 1.0], Recipe("ties"))
    assert stats.conflict_rate == 0.25 and stats.kept_fraction == 0.5


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="dare_ties, linear"):
        Recipe("slerp")


def test_negative_weights_vote_and_agree_as_in_mergekit():
    t1, t2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, 2.0])
    w = [1.0, -0.5]
    # mergekit: v = w * t, elect sign(sum v), keep v agreeing, divide by the sum of their weights
    v = [t1 * w[0], t2 * w[1]]
    elected = torch.where(v[0] + v[1] >= 0, 1.0, -1.0)
    agree = [torch.sign(x) == elected for x in v]
    num = sum(x * a for x, a in zip(v, agree, strict=True))
    den = sum(wi * a for wi, a in zip(w, agree, strict=True))
    want = num / torch.where(den == 0, 1.0, den)
    torch.testing.assert_close(ours("ties", [t1, t2], w, weighted_vote=True), want)


def test_l1_rescale_does_not_depend_on_the_thread_count():
    x = torch.randn(1_048_577, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(dare_drop(x, 0.5, 0, "w", "l1"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def test_non_contiguous_inputs_are_pruned_too():
    t = torch.arange(1.0, 7.0).reshape(2, 3).T  # a transposed view
    pruned = magnitude_prune(t, 0.5)
    assert pruned.tolist() == [[0.0, 4.0], [0.0, 5.0], [0.0, 6.0]]
    assert not torch.equal(dare_drop(t, 0.5, 1, "w"), t)
