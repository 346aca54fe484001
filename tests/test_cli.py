"""The real console script, end to end: create -> inspect -> apply -> transformers loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from protocol.container import DeltaReader
from protocol.model_dir import ModelDir
from tests.swarm import MERGESWARM, run_mergeswarm


def cli(*args: str, ok: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    proc = run_mergeswarm(args, env={**os.environ, **(env_extra or {})}, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def create(base, finetuned, out, *extra, ok: bool = True) -> subprocess.CompletedProcess:
    return cli(
        "delta", "create", "--base", base, "--finetuned", finetuned, "-o", out, *extra, ok=ok
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.slow
def test_create_inspect_apply_and_load(tiny_base, tiny_finetuned, tmp_path):
    key = tmp_path / "key.pem"
    delta = tmp_path / "d.msd"
    out = cli("delta", "create", "--base", tiny_base, "--finetuned", tiny_finetuned, "-o", delta,
              "--drop-rate", "0.9", "--seed", "5", "--codec", "bf16", "--key", key, "--meta", "steps=5")  # fmt: skip
    assert "wrote" in out.stdout and key.exists()

    info = json.loads(cli("delta", "inspect", delta, "--json", "--verify", tiny_base).stdout)
    assert info["base_id"] == cli("base-id", tiny_base).stdout.strip()
    assert (info["drop_rate"], info["seed"], info["codec"]) == (0.9, 5, "bf16")
    assert info["params"] == sum(i.numel for i in ModelDir(tiny_base).tensors.values())
    assert info["metadata"] == {"steps": "5"}
    assert info["bytes"] == delta.stat().st_size
    assert 0.08 < info["kept_fraction"] < 0.12
    table = cli("delta", "inspect", delta).stdout
    assert info["delta_id"] in table and "model.embed_tokens.weight" in table

    child = tmp_path / "child"
    cli("delta", "apply", "--base", tiny_base, delta, "-o", child)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(child)
    base, reader = ModelDir(tiny_base), DeltaReader(delta)
    for name, param in model.state_dict().items():
        assert torch.equal(param, base.tensor(name) + reader.read_tensor(name)), name
    assert {p.name for p in tiny_base.iterdir()} == {p.name for p in child.iterdir()}


@pytest.mark.slow
def test_lossless_delta_reproduces_the_finetune(tiny_base, tiny_finetuned, tmp_path):
    delta, child = tmp_path / "d.msd", tmp_path / "child"
    cli("delta", "create", "--base", tiny_base, "--finetuned", tiny_finetuned, "-o", delta,
        "--drop-rate", "0", "--codec", "fp32", "--key", tmp_path / "k.pem")  # fmt: skip
    cli("delta", "apply", "--base", tiny_base, delta, "-o", child)
    got, want = ModelDir(child), ModelDir(tiny_finetuned)
    for name in want.names():
        torch.testing.assert_close(got.tensor(name), want.tensor(name), rtol=0, atol=1e-6)


def test_key_defaults_to_the_data_dir(tiny_base, tiny_finetuned, tmp_path):
    cli("delta", "create", "--base", tiny_base, "--finetuned", tiny_finetuned, "-o", tmp_path / "d.msd",
        env_extra={"MERGESWARM_DATA_DIR": str(tmp_path / "data")})  # fmt: skip
    assert (tmp_path / "data" / "identity.pem").exists()


def test_applying_to_the_wrong_base_is_one_clear_error(
    tiny_base, tiny_finetuned, tiny_base_bf16_sharded, tmp_path
):
    delta = tmp_path / "d.msd"
    create(tiny_base, tiny_finetuned, delta, "--key", tmp_path / "k")
    apply = cli(
        "delta", "apply", "--base", tiny_base_bf16_sharded, delta, "-o", tmp_path / "x", ok=False
    )
    line = one_error_line(apply)
    assert line.startswith("mergeswarm: error:") and "made against base" in line
    assert not (tmp_path / "x").exists()


def test_corrupt_and_missing_inputs_are_one_clear_error(tiny_base, tmp_path):
    bad = tmp_path / "bad.msd"
    bad.write_bytes(b"MSDELTA\0" + b"\xff" * 50)
    assert "format version" in one_error_line(cli("delta", "inspect", bad, ok=False))
    missing = tmp_path / "nope"
    line = one_error_line(create(tiny_base, missing, tmp_path / "d.msd", ok=False))
    assert str(missing) in line and "not a directory" in line
    assert "not a directory" in one_error_line(cli("base-id", missing, ok=False))


def test_bad_flags_are_refused_by_name(tiny_base, tmp_path):
    proc = cli(
        "delta",
        "create",
        "--base",
        tiny_base,
        "--finetuned",
        tiny_base,
        "-o",
        tmp_path / "d",
        "--drop-rate",
        "1.5",
        ok=False,
    )
    assert proc.returncode == 2 and "--drop-rate" in proc.stderr and "[0, 1)" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["delta"],
        ["delta", "create"],
        ["delta", "inspect"],
        ["delta", "apply"],
        ["base-id"],
        ["demo"],
    ],
)
def test_every_command_has_help(args):
    out = cli(*args, "--help").stdout
    assert "usage: mergeswarm" in out


HELP_IMPORTS = """
import argparse, contextlib, io, sys
from node.cli import build_parser
def commands(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, path + [name])
seen = 0
for path in commands(build_parser(), []):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(path + ["--help"])
    except SystemExit:
        seen += 1
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "hivemind"})
print(seen, ",".join(heavy))
"""


def test_help_of_every_command_imports_no_torch_transformers_or_hivemind():
    proc = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, check=True
    )
    seen, heavy = proc.stdout.split(" ")
    assert int(seen) > 10  # every command and subcommand was asked for its help
    assert heavy.strip() == ""


@pytest.mark.slow
def test_demo_runs_the_round_trip(tmp_path):
    out = cli("demo", "--offline", "--workdir", tmp_path / "demo", "--steps", "10").stdout
    assert "mergeswarm demo: done" in out
    losses = {
        ln.split()[1]: float(ln.split()[2])
        for ln in out.splitlines()
        if ln.strip().startswith("loss ")
    }
    assert losses["finetuned"] < losses["genesis"]
    assert losses["child"] < losses["genesis"]
    assert (tmp_path / "demo" / "child" / "model.safetensors").exists()


def test_names_from_peers_cannot_drive_the_terminal(tmp_path, identity):
    from protocol.container import DeltaWriter

    path = tmp_path / "d.msd"
    with DeltaWriter(path, base_id="ab" * 32, identity=identity, drop_rate=0.0, seed=1) as w:
        w.add("evil\x1b[2J", "F32", torch.ones(2))
        w.finish()
    out = cli("delta", "inspect", path).stdout
    assert "\x1b" not in out and "'evil\\x1b[2J'" in out


def test_a_closed_pipe_is_not_an_error(tiny_base):
    proc = subprocess.run(
        f"{MERGESWARM} --help | head -c 10", shell=True, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_the_demo_offers_every_demo_model_and_only_those():
    from node.cli.demo import DEMO_MODEL_NAMES
    from node.demo.local_swarm import DEMO_MODELS

    assert tuple(DEMO_MODELS) == DEMO_MODEL_NAMES
    assert all(m.name == name for name, m in DEMO_MODELS.items())


def test_the_swarm_demo_passes_the_models_training_to_its_volunteers():
    from node.cli import build_parser
    from node.demo.local_swarm import DEMO_MODELS, volunteer_flags

    for model in DEMO_MODELS.values():
        flags = volunteer_flags(model.train)
        args = build_parser().parse_args(["node", *flags])
        for field in ("seq_len", "batch_size", "lr", "warmup_steps", "eval_blocks", "device"):
            want = getattr(model.train, field)
            assert type(want)(getattr(args, field)) == want, field  # flags stay strings here
