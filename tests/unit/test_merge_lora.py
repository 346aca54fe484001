"""LoRA adapters as merge inputs: expanded to dense scale * B @ A, checked against peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aggregator.engine import MergeInput, merge_models
from aggregator.methods import Recipe
from protocol.errors import BaseMismatchError, ModelDirError


def make_adapter(base_dir, out_dir, *, rslora=False, seed=0, **config):
    """A peft LoRA adapter with random (non-zero) A and B, and peft's own merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
        **config,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return peft_model.merge_and_unload().state_dict()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_expansion_matches_peft_merge_and_unload(tiny_base, tmp_path, rslora):
    want = make_adapter(tiny_base, tmp_path / "adapter", rslora=rslora)
    merge_models(
        tiny_base, [MergeInput(tmp_path / "adapter")], Recipe("task_arithmetic"), tmp_path / "out"
    )
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = [n for n in got if "q_proj" in n or "v_proj" in n]
    base = load_file(tiny_base / "model.safetensors")
    assert changed and all(not torch.equal(got[n], base[n]) for n in changed)


def test_lora_and_full_finetunes_merge_together(tiny_base, tiny_finetuned, tmp_path):
    make_adapter(tiny_base, tmp_path / "adapter")
    inputs = [MergeInput(tmp_path / "adapter"), MergeInput(tiny_finetuned)]
    report = merge_models(tiny_base, inputs, Recipe("ties"), tmp_path / "out", density=0.5)
    assert sorted(row["kind"] for row in report.inputs) == ["lora", "model"]


def test_lora_for_another_architecture_is_named(tiny_base, tiny_base_bf16_sharded, tmp_path):
    make_adapter(tiny_base, tmp_path / "adapter")
    other = tmp_path / "other"
    from node.training.tiny_model import build_tiny_model

    build_tiny_model(other, hidden_size=32, heads=2)
    with pytest.raises(
        BaseMismatchError, match="adapter: LoRA for 'model.layers.0.self_attn.q_proj.weight'"
    ):
        merge_models(other, [MergeInput(tmp_path / "adapter")], Recipe("ties"), tmp_path / "out")


def test_unsupported_lora_options_are_refused_by_name(tiny_base, tmp_path):
    make_adapter(tiny_base, tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="'use_dora' is not supported"):
        merge_models(
            tiny_base, [MergeInput(tmp_path / "adapter")], Recipe("ties"), tmp_path / "out"
        )


def test_alpha_pattern_follows_peft_matching(tiny_base, tmp_path):
    alpha_pattern = {"layers.0.self_attn.q_proj": 32, "proj": 2}
    want = make_adapter(tiny_base, tmp_path / "adapter", seed=1, alpha_pattern=alpha_pattern)
    merge_models(
        tiny_base, [MergeInput(tmp_path / "adapter")], Recipe("task_arithmetic"), tmp_path / "out"
    )
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lora_parts_we_do_not_expand_are_refused_by_name(tiny_base, tmp_path):
    from safetensors.torch import save_file

    make_adapter(tiny_base, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key.replace("lora_B.weight", "lora_B.bias")] = torch.zeros(weights[key].shape[0])
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ModelDirError, match="lora_B.bias is not a LoRA A/B weight"):
        merge_models(
            tiny_base, [MergeInput(tmp_path / "adapter")], Recipe("ties"), tmp_path / "out"
        )
