"""mergekit-style YAML configs and the `mergeswarm merge` command."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import load_file

from aggregator.config import ConfigError, load_config
from tests.test_cli import cli, one_error_line


def write(tmp_path, text: str):
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def mergekit_config(tmp_path, tiny_base, tiny_finetuned):
    return write(
        tmp_path,
        f"""
        merge_method: ties
        base_model: {tiny_base}
        models:
          - model: {tiny_base}
          - model: {tiny_finetuned}
            parameters:
              weight: 0.7
              density: 0.5
        parameters:
          normalize: true
          int8_mask: true
          lambda: 1.2
        dtype: bfloat16
        """,
    )


def test_a_mergekit_config_keeps_mergekits_meaning(mergekit_config, tiny_finetuned):
    config = load_config(mergekit_config)
    recipe = config.recipe()
    assert (recipe.method, recipe.lam, recipe.normalized, recipe.weighted_vote) == (
        "ties",
        1.2,
        True,
        True,
    )
    inputs = config.inputs()  # the base listed among models is skipped, as in mergekit
    assert [(i.path, i.weight, i.density) for i in inputs] == [(tiny_finetuned.resolve(), 0.7, 0.5)]
    assert config.output_dtype == "BF16"


@pytest.mark.parametrize(
    ("method", "extra", "want"),
    [
        ("trimmed_mean", "trim: 0.25", {"trim": 0.25}),
        ("median", "entry_clip: 8", {"entry_clip": 8.0}),
        (
            "centered_clip",
            "clip_radius: 2\n  clip_iterations: 5",
            {"clip_radius": 2.0, "clip_iterations": 5},
        ),
    ],
)
def test_robust_methods_and_their_options_read_from_yaml(
    tmp_path, tiny_base, tiny_finetuned, method, extra, want
):
    text = (
        f"merge_method: {method}\nbase_model: {tiny_base}\nmodels: [{{model: {tiny_finetuned}}}]\n"
    )
    recipe = load_config(write(tmp_path, text + f"parameters:\n  {extra}\n")).recipe()
    assert recipe.method == method and recipe.normalized
    assert {k: getattr(recipe, k) for k in want} == want


def test_a_robust_method_refuses_normalize_false(tmp_path, tiny_base, tiny_finetuned):
    text = f"merge_method: median\nbase_model: {tiny_base}\nmodels: [{{model: {tiny_finetuned}}}]\n"
    with pytest.raises(ConfigError, match="takes no normalize"):
        load_config(write(tmp_path, text + "parameters:\n  normalize: false\n"))


def test_our_additions_extend_the_schema(tmp_path, tiny_base, tiny_finetuned):
    config = load_config(
        write(
            tmp_path,
            f"""
            merge_method: dare_ties
            base_model: {tiny_base}
            models: [{{model: {tiny_finetuned}}}]
            parameters: {{drop_rate: 0.9, seed: 7, sign_method: frequency, weighted_vote: false, rescale: false}}
            """,
        )
    )
    recipe = config.recipe()
    assert config.default_density() == pytest.approx(0.1)
    assert (recipe.seed, recipe.sign_method, recipe.weighted_vote, recipe.dare_rescale) == (
        7,
        "frequency",
        False,
        "none",
    )
    assert recipe.normalized is False  # mergekit's default for dare_ties


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("merge_method: slerp", "merge_method: Input should be"),
        ("slices: []", "mergekit option 'slices' \\(layer slicing\\) is not supported"),
        ("parameters: {gamma: 0.01}", "parameters: mergekit option 'gamma'"),
        ("parameters: {densty: 0.5}", "parameters.densty: Extra inputs are not permitted"),
        (
            "parameters: {density: 1.5}",
            "parameters.density: Input should be less than or equal to 1",
        ),
        (
            "parameters: {density: 0.5, drop_rate: 0.5}",
            "either parameters.drop_rate or parameters.density",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path, tiny_base, tiny_finetuned, snippet, message):
    text = f"merge_method: ties\nbase_model: {tiny_base}\nmodels: [{{model: {tiny_finetuned}}}]\n"
    key = snippet.split(":")[0]
    text = (
        "\n".join(line for line in text.splitlines() if not line.startswith(key + ":"))
        + "\n"
        + snippet
    )
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_inputs_and_bad_yaml_name_the_problem(tmp_path, tiny_base):
    config = load_config(
        write(
            tmp_path, f"merge_method: ties\nbase_model: {tiny_base}\nmodels: [{{model: org/model}}]"
        )
    )
    with pytest.raises(ConfigError, match="'org/model' is not a local path"):
        config.inputs()
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [unclosed"))
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.slow
def test_merge_command_dry_run_then_write(mergekit_config, tmp_path):
    out = tmp_path / "merged"
    dry = cli("merge", mergekit_config, "--dry-run").stdout
    assert "dry run" in dry and not out.exists()
    cli("merge", mergekit_config, "-o", out)
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_merge_command_errors_are_one_line(tmp_path, tiny_base):
    bad = write(
        tmp_path, f"merge_method: ties\nbase_model: {tiny_base}\nmodels: [{{model: /nope}}]"
    )
    assert "'/nope' is not a local path" in one_error_line(
        cli("merge", bad, "-o", tmp_path / "o", ok=False)
    )
    assert "give -o OUT_DIR" in one_error_line(cli("merge", bad, ok=False))


def test_linear_averages_the_base_too_as_mergekit_does(tmp_path, tiny_base, tiny_finetuned):
    listed = load_config(
        write(
            tmp_path,
            f"merge_method: linear\nbase_model: {tiny_base}\nmodels: [{{model: {tiny_base}}}, {{model: {tiny_finetuned}}}]",
        )
    )
    assert sorted(i.path.name for i in listed.inputs()) == sorted(
        [tiny_base.name, tiny_finetuned.name]
    )
    unlisted = load_config(
        write(
            tmp_path,
            f"merge_method: linear\nbase_model: {tiny_base}\nmodels: [{{model: {tiny_finetuned}}}]",
        )
    )
    with pytest.raises(ConfigError, match="averages the base model too"):
        unlisted.inputs()


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("parameters: {rescale: true}", "rescale applies to dare methods only"),
        ("parameters: {lambda: .nan}", "finite number"),
        ("models: [{model: MODEL, parameters: {weight: .inf}}]", "finite number"),
    ],
)
def test_options_that_would_be_ignored_or_poison_the_merge_are_refused(
    tmp_path, tiny_base, tiny_finetuned, snippet, message
):
    text = f"merge_method: ties\nbase_model: {tiny_base}\n" + snippet.replace(
        "MODEL", str(tiny_finetuned)
    )
    if not snippet.startswith("models"):
        text += f"\nmodels: [{{model: {tiny_finetuned}}}]"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))
