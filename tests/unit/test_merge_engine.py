"""The streaming merge engine: determinism, inputs of every kind, and hostile inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aggregator.engine import REPORT_FILE, MergeInput, merge_models
from aggregator.inputs import open_source
from aggregator.methods import Recipe, merge_tensor
from protocol.delta import apply_deltas, create_delta
from protocol.errors import BaseMismatchError
from protocol.ids import base_id
from protocol.model_dir import ModelDir


def test_input_order_does_not_change_a_bit(tiny_base, finetunes, tmp_path):
    recipe = Recipe("ties")
    ids = set()
    for n, order in enumerate([[0, 1, 2], [2, 0, 1], [1, 2, 0]]):
        inputs = [MergeInput(finetunes[i], weight=1.0 + i) for i in order]
        ids.add(merge_models(tiny_base, inputs, recipe, tmp_path / f"o{n}", density=0.3).child_id)
    assert len(ids) == 1
    first = (tmp_path / "o0" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "o1" / "model.safetensors").read_bytes()
    assert base_id(tmp_path / "o0") == ids.pop()


def test_thread_count_does_not_change_a_bit(tiny_base, finetunes, tmp_path):
    before = torch.get_num_threads()
    ids = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            inputs = [MergeInput(p) for p in finetunes]
            ids.append(
                merge_models(
                    tiny_base, inputs, Recipe("dare_ties"), tmp_path / f"t{threads}", density=0.5
                ).child_id
            )
    finally:
        torch.set_num_threads(before)
    assert ids[0] == ids[1]


def test_engine_equals_the_method_applied_tensor_by_tensor(tiny_base, finetunes, tmp_path):
    recipe = Recipe("ties", lam=1.5)
    merge_models(
        tiny_base, [MergeInput(p, 2.0) for p in finetunes], recipe, tmp_path / "out", density=0.4
    )
    got = load_file(tmp_path / "out" / "model.safetensors")
    base, fts = ModelDir(tiny_base), [ModelDir(p) for p in finetunes]
    order = sorted(range(3), key=lambda i: open_source(finetunes[i]).order_key)
    for name in ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]:
        b = base.tensor(name)
        tvs = [fts[i].tensor(name) - b for i in order]
        merged, _ = merge_tensor(name, tvs, [2.0] * 3, [0.4] * 3, recipe)
        assert torch.equal(got[name], b + merged)


def test_task_arithmetic_of_one_finetune_reproduces_its_logits(tiny_base, finetunes, tmp_path):
    from transformers import AutoModelForCausalLM

    merge_models(tiny_base, [MergeInput(finetunes[0])], Recipe("task_arithmetic"), tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        want = AutoModelForCausalLM.from_pretrained(finetunes[0])(ids).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)


def test_msd_deltas_merge_like_apply(tiny_base, finetunes, tmp_path, identity):
    deltas = []
    for i, ft in enumerate(finetunes[:2]):
        deltas.append(tmp_path / f"{i}.msd")
        create_delta(
            tiny_base, ft, deltas[-1], identity=identity, drop_rate=0.5, seed=i, codec="fp32"
        )
    merge_models(
        tiny_base,
        [MergeInput(d) for d in reversed(deltas)],
        Recipe("task_arithmetic"),
        tmp_path / "m",
    )
    apply_deltas(tiny_base, deltas, tmp_path / "a")
    m, a = (
        load_file(tmp_path / "m" / "model.safetensors"),
        load_file(tmp_path / "a" / "model.safetensors"),
    )
    for name in m:
        torch.testing.assert_close(m[name], a[name], rtol=0, atol=1e-6)


def test_a_stale_delta_merges_onto_a_newer_base_only_when_its_ancestor_is_named(
    tiny_base, finetunes, tmp_path, identity
):
    stale = tmp_path / "stale.msd"  # trained on tiny_base, while the head moved to finetunes[1]
    create_delta(tiny_base, finetunes[0], stale, identity=identity, drop_rate=0.0, codec="fp32")
    with pytest.raises(BaseMismatchError, match="made against base"):
        merge_models(finetunes[1], [MergeInput(stale)], Recipe("task_arithmetic"), tmp_path / "x")
    ancestor = base_id(ModelDir(tiny_base))
    merge_models(
        finetunes[1],
        [MergeInput(stale, weight=0.5, trained_on=ancestor)],
        Recipe("task_arithmetic"),
        tmp_path / "m",
    )
    head, old, ft = (
        load_file(p / "model.safetensors") for p in (finetunes[1], tiny_base, finetunes[0])
    )
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name in merged:  # the head plus half of what the stale delta learned on its own base
        torch.testing.assert_close(merged[name], head[name] + 0.5 * (ft[name] - old[name]))
    with pytest.raises(BaseMismatchError, match="made against base"):  # another ancestor: no
        merge_models(
            finetunes[1],
            [MergeInput(stale, trained_on="ab" * 32)],
            Recipe("task_arithmetic"),
            tmp_path / "y",
        )


def test_dare_methods_do_not_drop_msd_deltas_again(tiny_base, finetunes, tmp_path, identity):
    delta = tmp_path / "d.msd"
    create_delta(
        tiny_base, finetunes[0], delta, identity=identity, drop_rate=0.9, seed=1, codec="fp32"
    )
    report = merge_models(
        tiny_base, [MergeInput(delta)], Recipe("dare_linear"), tmp_path / "m", density=0.1
    )
    kept = [row["kept_fraction"] for row in report.tensors.values()]
    assert 0.08 < sum(kept) / len(kept) < 0.12  # ~10% from the delta itself, not 1%


def test_report_and_dtype_override(tiny_base, finetunes, tmp_path):
    merge_models(
        tiny_base,
        [MergeInput(p) for p in finetunes],
        Recipe("ties"),
        tmp_path / "o",
        density=0.2,
        dtype="BF16",
    )
    report = json.loads((tmp_path / "o" / REPORT_FILE).read_text())
    assert report["child_id"] == base_id(tmp_path / "o")
    assert report["base_id"] == base_id(tiny_base)  # hashed along the merge
    assert report["recipe"]["method"] == "ties" and len(report["inputs"]) == 3
    row = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert 0.19 < row["kept_fraction"] <= 0.2 and 0 < row["conflict_rate"] < 1
    assert all(
        t.dtype == torch.bfloat16 for t in load_file(tmp_path / "o" / "model.safetensors").values()
    )
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dry_run_checks_without_writing(tiny_base, finetunes, tmp_path):
    report = merge_models(
        tiny_base, [MergeInput(finetunes[0])], Recipe("ties"), tmp_path / "o", dry_run=True
    )
    assert report.base_id == base_id(tiny_base)
    assert report.inputs[0]["kind"] == "model" and len(report.inputs[0]["fingerprint"]) == 64
    assert not (tmp_path / "o").exists()


def _variant(src, dst, mutate):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), "has shape \\[3\\]"),
        (lambda t: t.pop("model.norm.weight"), "'model.norm.weight' of the base is missing"),
        (lambda t: t.update({"extra.weight": torch.ones(2)}), "'extra.weight' is not in the base"),
    ],
)
def test_inputs_that_do_not_fit_are_named(tiny_base, finetunes, tmp_path, mutate, message):
    bad = _variant(finetunes[0], tmp_path / "bad", mutate)
    with pytest.raises(BaseMismatchError, match=f"{bad}.*{message}"):
        merge_models(
            tiny_base, [MergeInput(finetunes[1]), MergeInput(bad)], Recipe("ties"), tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_nan_in_an_input_is_named(tiny_base, finetunes, tmp_path):
    def poison(t):
        t["model.norm.weight"] = t["model.norm.weight"].clone()
        t["model.norm.weight"][3] = float("nan")

    bad = _variant(finetunes[0], tmp_path / "nan", poison)
    with pytest.raises(BaseMismatchError, match=f"{bad}.*'model.norm.weight' contains NaN"):
        merge_models(tiny_base, [MergeInput(bad)], Recipe("ties"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_delta_for_another_base_is_named(
    tiny_base, tiny_base_bf16_sharded, finetunes, tmp_path, identity
):
    delta = tmp_path / "d.msd"
    create_delta(tiny_base, finetunes[0], delta, identity=identity)
    with pytest.raises(BaseMismatchError, match=f"{delta}: made against base"):
        merge_models(tiny_base_bf16_sharded, [MergeInput(delta)], Recipe("ties"), tmp_path / "o")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bases_merge_like_peft(tmp_path, dtype):
    from peft.utils import merge_utils as peft

    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(64, 48, generator=g).to(dtype),
        "b": torch.randn(48, generator=g).to(dtype),
    }
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    inputs = []
    for i in range(3):
        ft = {
            k: (v.float() + torch.randn(v.shape, generator=g) * 0.05).to(dtype)
            for k, v in base.items()
        }
        (tmp_path / f"ft{i}").mkdir()
        save_file(ft, tmp_path / f"ft{i}" / "model.safetensors")
        inputs.append(tmp_path / f"ft{i}")
    merge_models(
        tmp_path / "base",
        [MergeInput(p) for p in inputs],
        Recipe("ties"),
        tmp_path / "out",
        density=1.0,
    )
    got = load_file(tmp_path / "out" / "model.safetensors")
    fts = [load_file(p / "model.safetensors") for p in inputs]
    for name, b in base.items():
        tvs = [ft[name].float() - b.float() for ft in fts]
        want = (b.float() + peft.ties(tvs, torch.ones(3), 1.0)).to(dtype)
        assert got[name].dtype == dtype
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def test_the_same_input_twice_is_refused(tiny_base, finetunes, tmp_path):
    with pytest.raises(BaseMismatchError, match="the same input as"):
        merge_models(
            tiny_base,
            [MergeInput(finetunes[0]), MergeInput(finetunes[0])],
            Recipe("ties"),
            tmp_path / "o",
        )


def test_inputs_with_equal_fingerprints_order_by_full_id(tiny_base, finetunes, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"  # 16 KiB: sampled every 256 bytes

    def nudge(t):
        t[name] = t[name].clone()
        t[name].view(-1)[20] += 0.5  # bytes 80-83: between two samples

    twin = _variant(finetunes[0], tmp_path / "twin", nudge)
    a, b = open_source(finetunes[0]), open_source(twin)
    assert a.order_key == b.order_key and a.id != b.id
    outs = []
    for i, order in enumerate(([finetunes[0], twin], [twin, finetunes[0]])):
        recipe = Recipe("dare_ties", seed=7)  # the seed of each input depends on the order
        merge_models(tiny_base, [MergeInput(p) for p in order], recipe, tmp_path / f"o{i}")
        outs.append((tmp_path / f"o{i}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_a_non_float_tensor_that_differs_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    save_file(
        {"w": torch.zeros(3), "steps": torch.tensor([1, 2])},
        tmp_path / "base" / "model.safetensors",
    )
    (tmp_path / "ft").mkdir()
    save_file(
        {"w": torch.ones(3), "steps": torch.tensor([1, 3])}, tmp_path / "ft" / "model.safetensors"
    )
    with pytest.raises(BaseMismatchError, match="non-float tensor 'steps' differs"):
        merge_models(
            tmp_path / "base", [MergeInput(tmp_path / "ft")], Recipe("ties"), tmp_path / "o"
        )
