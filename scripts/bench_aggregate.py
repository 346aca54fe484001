#!/usr/bin/env python
"""Benchmark how many volunteers one aggregator can merge per round on this machine.

A float32 base (the swarm's genesis dtype) with SmolLM2-135M's shapes, built from a
LlamaConfig with a fixed seed (nothing is downloaded), and the largest K's deltas, made
once as volunteers make them: a small random perturbation of the base each, signed by
its own key, through ``protocol.delta.create_delta`` with the swarm config's drop rate and
codec. For each K a fresh process times (a) the aggregator's checks of K deltas on disk:
``inspect_delta`` per delta (signature, base, layout, drop rate, every tensor decoded for
finiteness and the norm) and the round's norm screen (``weigh_admitted``); (b) the merge,
``merge_models`` with the swarm's default recipe and Nesterov outer step, writing the
child and its momentum. Prints seconds (also per delta and against K=1), peak RSS and
bytes downloaded per round, and the largest K whose checks and merge fit each round
period, extrapolated linearly from the measured times.

    .venv/bin/python scripts/bench_aggregate.py            # ~10 min on 2 idle cores, 3.5 GB in /tmp
    .venv/bin/python scripts/bench_aggregate.py --model tiny   # smoke run, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import peak_rss_mb

# HuggingFaceTB/SmolLM2-135M's LlamaConfig (134,515,008 parameters, embeddings tied)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536)
SMOLLM2_135M |= dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
SMOLLM2_135M |= dict(max_position_embeddings=8192, rope_theta=1e5, tie_word_embeddings=True)
DELTA_STD = 1e-3  # per-entry std of a volunteer's perturbation (bench_common's fine-tune)
SEED = 0
# in the work dir: what the parent made for the workers, and what each worker writes
SETUP_FILE, CHILD_DIR = "setup.json", "child"
PREV_MOMENTUM, NEXT_MOMENTUM = "momentum-prev.safetensors", "momentum-next.safetensors"


def build_base(out: Path, model: str) -> Path:
    """A float32 model directory: the tests' tiny model, or SmolLM2-135M's shapes."""
    if model == "tiny":
        from node.training.tiny_model import build_tiny_model

        return build_tiny_model(out, seed=SEED)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.float32).save_pretrained(out)
    return out


def swarm_config(genesis_id: str):
    """The swarm config's defaults (merge recipe, outer step, drop rate, codec, screening)."""
    from protocol.swarm_config import SwarmConfig

    return SwarmConfig(swarm_id="bench-aggregate", genesis_id=genesis_id)


def make_deltas(base: Path, config, count: int, out: Path) -> list[dict]:
    """``count`` volunteers' deltas against ``base``, each signed by its own new key."""
    import torch

    from protocol.delta import TensorMap, create_delta
    from protocol.identity import Identity
    from protocol.model_dir import FLOAT_DTYPES, ModelDir

    made = []
    with ModelDir(base) as md:
        for i in range(count):
            started = time.perf_counter()
            g = torch.Generator().manual_seed(SEED + 1 + i)
            trained = {n: md.tensor(n) for n in md.names()}
            for name, t in trained.items():
                if md.tensors[name].dtype in FLOAT_DTYPES:
                    t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype), alpha=DELTA_STD)
            identity, path = Identity.generate(), out / f"delta{i}.msd"
            rules = {"drop_rate": config.drop_rate, "codec": config.codec, "seed": SEED + 1 + i}
            delta_id, _ = create_delta(base, TensorMap(trained), path, identity=identity, **rules)
            size = path.stat().st_size
            made.append(dict(path=str(path), author=identity.author, id=delta_id, size=size))
            seconds = time.perf_counter() - started
            print(f"  delta {i + 1}/{count}: {size / 2**20:.1f} MiB in {seconds:.1f} s")
    return made


def write_momentum(base: Path, out: Path) -> None:
    """A previous head's momentum (zeros: reading it costs the same as any values)."""
    import torch

    from protocol.model_dir import ModelDir
    from protocol.momentum import MomentumWriter, momentum_layout

    with ModelDir(base) as md:
        writer = MomentumWriter(out, md)
        for info in momentum_layout(md):
            writer.add(info.name, torch.zeros(info.shape, dtype=torch.float32))
        writer.close()


def prepare(work: Path, model: str, count: int) -> int:
    """Write the base, ``count`` deltas, a previous momentum and the setup file into
    ``work``; return the base's parameter count."""
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir

    print(f"building the {model} base ...")
    base = build_base(work / "base", model)
    with ModelDir(base) as md:
        params = sum(math.prod(info.shape) for info in md.tensors.values())
        genesis = base_id(md)
    config = swarm_config(genesis)
    print(f"making {count} deltas ({config.codec}, drop rate {config.drop_rate:g}) ...")
    deltas = make_deltas(base, config, count, work)
    write_momentum(base, work / PREV_MOMENTUM)
    setup = {"base": str(base), "base_id": genesis, "deltas": deltas}
    (work / SETUP_FILE).write_text(json.dumps(setup))
    os.sync()  # the setup's ~1 GB of writes would otherwise still be flushing during K=1
    return params


def worker(work: Path, k: int) -> dict:
    """One round's checks and merge of the first ``k`` deltas, timed in this process."""
    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe
    from aggregator.outer import OuterStep, outer_lr
    from aggregator.screening import Admitted, Candidate, inspect_delta, weigh_admitted
    from protocol.model_dir import ModelDir
    from protocol.records import DeltaAnnouncement

    setup = json.loads((work / SETUP_FILE).read_text())
    base, bid, deltas = Path(setup["base"]), setup["base_id"], setup["deltas"][:k]
    cfg = swarm_config(bid)
    rules = {"max_bytes": cfg.max_delta_bytes, "drop_rate": cfg.drop_rate}
    started, cpu = time.perf_counter(), time.process_time()
    admitted = []
    with ModelDir(base) as parent:  # one at a time, as the daemon's inspection lock has it
        for d in deltas:
            ann = DeltaAnnouncement(base_id=bid, delta_id=d["id"], size=d["size"], round=0)
            c = Candidate(d["author"], ann, age=0)
            _, norm = inspect_delta(Path(d["path"]), c, parent, **rules)
            admitted.append(Admitted(c, norm))
    verdicts = weigh_admitted(admitted, cfg, scored=False, newcomers=set())
    check_s, check_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    weights = [verdicts[d["id"]].weight for d in deltas]
    if None in weights:
        raise SystemExit(f"K={k}: the norm screen refused a delta; the deltas are not alike")
    inputs = [MergeInput(Path(d["path"]), weight=w) for d, w in zip(deltas, weights, strict=True)]
    outer = None
    if cfg.outer_optimizer != "none":  # round 2 on: steps from the parent head's momentum
        lr = outer_lr(cfg.outer_lr, cfg.outer_warmup, 2)
        paths = {"previous": work / PREV_MOMENTUM, "out": work / NEXT_MOMENTUM}
        outer = OuterStep(lr=lr, momentum=cfg.outer_momentum, **paths)
    started, cpu = time.perf_counter(), time.process_time()
    merge_models(
        base, inputs, Recipe.for_swarm(cfg), work / CHILD_DIR, density=cfg.density, outer=outer
    )
    merge_s, merge_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    size = sum(d["size"] for d in deltas)
    row = dict(check_s=check_s, merge_s=merge_s, peak_rss_mb=peak_rss_mb(), download_bytes=size)
    return row | dict(check_cpu_s=check_cpu_s, merge_cpu_s=merge_cpu_s)  # contention shows here


def run_worker(work: Path, k: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(k), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"K={k} worker failed:\n{proc.stderr[-4000:]}")
    shutil.rmtree(work / CHILD_DIR)
    (work / NEXT_MOMENTUM).unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_k(rows: dict[int, dict], period: float) -> int | None:
    """The largest K whose checks and merge fit ``period``, from a least-squares line
    through the measured totals (None: fewer than two K measured)."""
    if len(rows) < 2:
        return None
    ks = list(rows)
    totals = [rows[k]["check_s"] + rows[k]["merge_s"] for k in ks]
    slope, intercept = statistics.linear_regression(ks, totals)
    if slope <= 0:
        return None
    return max(0, math.floor((period - intercept) / slope))


def report(model: str, params: int, rows: dict[int, dict], periods: list[float]) -> list[str]:
    from protocol.swarm_config import SwarmConfig

    one = rows[1]
    lines = [
        f"# bench_aggregate: {model} ({params:,} params, float32 base), torch threads = cores",
        f"command: {' '.join(sys.argv)}",
        "check: inspect_delta per delta + weigh_admitted; merge: merge_models with the default "
        "recipe and Nesterov outer step, child and momentum written; one fresh process per K "
        "(after an untimed warm-up one)",
        "",
        "CPU s: this process's user + sys time (all threads); wall s far above CPU s / threads "
        "means it waited: on other processes' load, or on the disk",
        "",
        "| K | download MiB | check s | check s/delta | merge s | merge s/delta | total s | check / K=1 | merge / K=1 | total / K=1 | peak RSS MiB | check CPU s | merge CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        c, m, c1, m1 = r["check_s"], r["merge_s"], one["check_s"], one["merge_s"]
        cells = [k, f"{r['download_bytes'] / 2**20:.2f}", f"{c:.2f}", f"{c / k:.3f}", f"{m:.2f}"]
        cells += [f"{m / k:.3f}", f"{c + m:.2f}", f"{c / c1:.2f}x", f"{m / m1:.2f}x"]
        cells += [f"{(c + m) / (c1 + m1):.2f}x", f"{r['peak_rss_mb']:.0f}"]
        cells += [f"{r['check_cpu_s']:.2f}", f"{r['merge_cpu_s']:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if len(rows) >= 2:
        ks = list(rows)
        slope, _ = statistics.linear_regression(ks, [rows[k]["peak_rss_mb"] for k in ks])
        lines += ["", f"peak RSS grows {slope:.1f} MiB per delta (least squares over K)"]
    lines += ["", "largest K per round period (EXTRAPOLATED linearly from the measured totals):"]
    for period in periods:
        found = max_k(rows, period)
        lines.append(
            f"  {period:g} s: " + ("n/a (one K measured)" if found is None else f"K = {found}")
        )
    field = SwarmConfig.model_fields["max_deltas"]
    cap = next(m.le for m in field.metadata if hasattr(m, "le"))
    lines.append(f"(the swarm config's max_deltas: {field.default} by default, at most {cap})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2-135m", "tiny"], default="smollm2-135m")
    parser.add_argument(
        "--k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="deltas per round"
    )
    parser.add_argument(
        "--round-period", type=float, action="append", help="seconds (repeatable; default 60, 300)"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.work, args.worker)))
        return 0
    if min(args.k) < 1:
        parser.error("--k: every K must be at least 1")
    ks = sorted(set(args.k) | {1})  # K=1 is the reference of the ratios
    periods = args.round_period or [60.0, 300.0]

    with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as tmp:
        work = Path(tmp)
        params = prepare(work, args.model, max(ks))
        print("warm-up: K=1, not counted ...")
        run_worker(work, 1)  # the first worker after the setup runs slow (1.9 s vs 0.7 s check)
        rows = {}
        for k in ks:
            print(f"K={k}: checks and merge in a fresh process ...")
            rows[k] = r = run_worker(work, k)
            print(f"  check {r['check_s']:.2f} s, merge {r['merge_s']:.2f} s, ", end="")
            print(f"peak RSS {r['peak_rss_mb']:.0f} MiB, load {os.getloadavg()[0]:.1f}")
    print("\n".join(report(args.model, params, rows, periods)))
    if args.json:
        out = {
            "model": args.model,
            "params": params,
            "rows": {str(k): r for k, r in rows.items()},
            "max_k_per_period": {f"{p:g}": max_k(rows, p) for p in periods},
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up under tee
    sys.exit(main())
