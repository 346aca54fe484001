"""The benchmarks still run end to end (their figures are output, not asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.demo.local_swarm import DEMO_MODELS
from protocol.swarm_config import SwarmConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_codec.py"


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_codec_smoke_run_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--scale",
            "0.002",
            "--p",
            "0.9",
            "--codecs",
            "bf16",
            "int8",
            "--skip-real",
            "--json",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## Targets (synthetic model)" in proc.stdout
    (synthetic,) = json.loads(out.read_text())
    assert [(r["p"], r["codec"]) for r in synthetic["rows"]] == [(0.9, "bf16"), (0.9, "int8")]
    for row in synthetic["rows"]:
        assert row["enc"]["params"] == row["dec"]["params"] == synthetic["params"]
        assert 0 < row["enc"]["bytes"] < row["coo"]["enc"]["bytes"]


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_merge_smoke_run_agrees_with_peft(tmp_path):
    out = tmp_path / "bench.json"
    script = SCRIPT.with_name("bench_merge.py")
    proc = subprocess.run(
        [sys.executable, script, "--scale", "0.005", "--k", "2", "--json", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["k"], r["method"]) for r in rows] == [(2, "ties"), (2, "dare_ties")]
    for row in rows:
        assert row["diff"]["outside_tolerance"] == 0
        assert row["ours"]["seconds"] > 0 and row["peft"]["seconds"] > 0


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_transfer_smoke_run_moves_the_blob_every_way(tmp_path):
    out = tmp_path / "bench.json"
    script = SCRIPT.with_name("bench_transfer.py")
    proc = subprocess.run(
        [sys.executable, script, "--mb", "5", "--peers", "3", "--rounds", "2", "--json", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| blob protocol (pieces verified, stored) |" in proc.stdout
    result = json.loads(out.read_text())
    assert {k: len(v) for k, v in result["pair"].items()} == {"blob": 2, "raw": 2, "tcp": 2}
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    assert set(result["hashing"]) == {"blake3", "sha256"} and min(result["hashing"].values()) > 0
    assert "piece hashes on one core: BLAKE3" in proc.stdout
    for part in ("pull", "swarm"):
        assert result[part]["seconds"] > 0
    assert result["pull"]["origin_copies"] > 1.5  # nobody else serves: the origin sent both


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_quality_smoke_run_reports_every_row_against_joint_training(tmp_path):
    out, picture = tmp_path / "quality.json", tmp_path / "quality.png"
    script = SCRIPT.with_name("bench_quality.py")
    args = ["--model", "tiny", "--rounds", "2", "--round-steps", "3", "--pretrain-steps", "20"]
    args += ["--swarm", "nesterov:linear", "--sim", "none:linear", "--sweep", "0.7:0.5:1:ties"]
    args += ["--workdir", tmp_path / "work", "--json", out, "--plot", picture]
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    domains = {"manual", "code", "docs", "license"}
    outer = {name: f.default for name, f in SwarmConfig.model_fields.items()}  # the daemons'
    swarm = f"swarm nesterov lr={outer['outer_lr']:g} mu={outer['outer_momentum']:g}, linear"
    sim = "sim nesterov lr=0.7 mu=0.5 warmup=1, ties"
    assert result["model"] == "tiny"
    assert {"genesis", "joint training", swarm, sim, "sim none, linear"} <= set(result["rows"])
    assert "merge ties" in result["rows"]
    assert {f"expert {d}" for d in domains} <= set(result["rows"])
    for row in result["rows"].values():
        assert set(row["loss"]) == domains
    assert set(result["fraction_of_joint"]) >= {swarm, sim}
    assert [len(result["curves"][k]) for k in ("joint training", swarm, sim)] == [2, 2, 2]
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_compression_smoke_run_reports_bytes_and_kept_gain_for_every_row(tmp_path):
    out, picture = tmp_path / "compression.json", tmp_path / "compression.png"
    script = SCRIPT.with_name("bench_compression.py")
    rows = ["bf16:0.9", "int4:0.75:ef", "int8:0.9:topk:ef"]
    args = ["--model", "tiny", "--rounds", "2", "--round-steps", "3", "--pretrain-steps", "20"]
    args += ["--volunteers", "2", "--rows", *rows, "--workdir", tmp_path / "work"]
    args += ["--json", out, "--plot", picture]
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and set(result["rows"]) == {"fp32:0", *rows}
    for name, row in result["rows"].items():
        assert set(row) >= {"bytes_per_param", "retained_single", "retained_swarm"}, name
        assert 0 < row["bytes_per_param"] < 5
    dense = result["rows"]["fp32:0"]
    assert dense["retained_swarm"] == 1.0 and abs(dense["retained_single"] - 1.0) < 0.02
    assert result["rows"]["int4:0.75:ef"]["bytes_per_param"] < 0.3 < dense["bytes_per_param"]
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"


def _bench_quality():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", SCRIPT.parent / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_quality_runs_larger_on_cuda_and_as_measured_on_cpu():
    bench = _bench_quality()
    smol = DEMO_MODELS["smollm2-135m"]
    on_cpu, rounds = bench.scaled(smol, "cpu")
    assert rounds == 3 and on_cpu.round_steps == smol.round_steps
    assert on_cpu.train == smol.train.model_copy(update={"device": "cpu"})
    on_gpu, rounds = bench.scaled(smol, "cuda")
    assert rounds > 3 and on_gpu.round_steps > smol.round_steps
    assert on_gpu.train.device == "cuda"
    assert on_gpu.train.seq_len > smol.train.seq_len
    assert on_gpu.train.batch_size > smol.train.batch_size
    assert on_gpu.train.lr == smol.train.lr and on_gpu.drop_rate == smol.drop_rate


def test_bench_quality_default_rows_parse_for_every_demo_model():
    bench = _bench_quality()
    assert set(bench.DEFAULT_ROWS) == set(DEMO_MODELS)
    base = bench.SwarmRow("nesterov", "linear", lr=1.0, momentum=0.5)
    for daemons, sims in bench.DEFAULT_ROWS.values():
        rows = [bench.parse_row(text, base) for text in daemons + sims]
        assert any(r.outer == "nesterov" and r.method == "linear" for r in rows)


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_robustness_smoke_run_reports_every_attack_against_the_clean_round(tmp_path):
    out = tmp_path / "robustness.json"
    script = SCRIPT.with_name("bench_robustness.py")
    args = ["--model", "tiny", "--pretrain-steps", "20", "--round-steps", "3"]
    args += ["--attacks", "sign_flip", "sybil_crowd", "median_drag", "--json", out]
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny"
    for key in ("clean_loss", "clean_loss_no_eval"):
        assert isinstance(result[key], float)
    for key in ("attacks", "attacks_no_eval"):
        assert set(result[key]) == {"sign_flip", "sybil_crowd", "median_drag"}
        for row in result[key].values():
            assert {"loss", "honest_merged", "honest_total"} <= set(row)
            assert row["honest_total"] == 4 and 0 <= row["honest_merged"] <= 4


@pytest.mark.slow
@pytest.mark.heavy
def test_soak_smoke_run_survives_a_kill_9_and_accounts_for_every_delta(tmp_path):
    """A short soak: two volunteers, one chaos event (a SIGKILL and a restart); the swarm
    keeps making heads and the report names every figure (their values are the benchmark's:
    a run this short under CI's load can show a stuck round, docs/benchmarks.md)."""
    out = tmp_path / "soak.json"
    script = SCRIPT.with_name("soak.py")
    args = ["--volunteers", "2", "--minutes", "1.2", "--chaos-every", "35"]
    args += ["--sample-every", "20", "--round-period", "5", "--round-steps", "5"]
    args += ["--pretrain-steps", "20", "--workdir", tmp_path / "soak", "--json", out]
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [e["kind"] for e in result["chaos"]] == ["kill9"]
    assert result["rounds"] >= 2 and isinstance(result["stuck_rounds"], int)
    deltas = result["deltas"]
    assert deltas["published"] >= 2 and deltas["merged"] >= 1
    fates = ("merged", "rejected", "late", "superseded", "pending", "unavailable", "unaccounted")
    assert sum(deltas[k] for k in fates) == deltas["published"], deltas
    assert result["unaccounted_deltas"] == deltas["unaccounted"] == len(deltas["unaccounted_ids"])
    assert result["processes_left_behind"] == 0
    assert "rounds completed" in proc.stdout


def test_simulate_swarm_spreads_a_patch_and_the_deltas_and_reloads_its_figures(tmp_path):
    """The simulation (pure Python, seconds): every peer gets the patch, the origin sends at
    least one copy and the rest is traded, the aggregators collect every delta; a saved run
    is reported and plotted again without simulating."""
    out, plot = tmp_path / "scale.json", tmp_path / "scale.png"
    script = SCRIPT.with_name("simulate_swarm.py")
    args = ["--peers", "8", "30", "--patch-bytes", "20000000", "--session", "0", "--json", out]
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"8", "30"}
    for n, run in runs.items():
        patch, delta = run["patch"], run["delta"]
        assert patch["holders"] == patch["fetchers"] == int(n) - 1  # no churn: all of them
        assert 0 < patch["t50"] <= patch["t90"] <= patch["t100"]
        assert 1.0 <= run["origin_copies"] < int(n) - 1  # the fetchers traded
        assert delta["k"] == min(int(n) - 4, 16) and delta["collect_s"] > 0
    proc = subprocess.run(
        [sys.executable, script, "--load", out, "--plot", plot],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 30 |" in proc.stdout and plot.stat().st_size > 0
