#!/usr/bin/env python
"""Benchmark the streaming merge engine against peft's merge_utils in the same run.

Merges K in {2, 4, 8} fine-tunes of a synthetic ~306M-parameter fp32 model
(147 tensors, the largest 50.3M) with ``ties`` (density 0.2) and
``dare_ties`` (drop rate 0.9, i.e. density 0.1). Each merge runs in a fresh
process: ours streams tensor by tensor from the model directories; the
oracle loads every model whole (peft's merge_utils work on in-memory
tensors) and calls ``peft.utils.merge_utils.ties`` / ``dare_ties`` per tensor,
with peft's random pruning swapped for our portable DARE mask so both see the
same mask. Both write a safetensors model. Prints wall time, parameters per
second, peak RSS, and how far the two results are apart.

    .venv/bin/python scripts/bench_merge.py             # ~25 minutes, ~16 GB of temporary files
    .venv/bin/python scripts/bench_merge.py --scale 0.02 --k 2   # smoke run

With ``--mergekit PATH`` (the ``mergekit-yaml`` of an environment where
mergekit is installed; default: one beside this Python, if any), the same
merges also run through mergekit's CLI at the K given by ``--mergekit-k``
(default 4), from a mergekit YAML config, timed with its own peak RSS.
mergekit's ``ties`` result is compared with ours; its ``dare_ties`` draws its
own random mask, so it is timed only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import largest_params, layout, peak_rss_mb, write_model

METHODS = {"ties": 0.2, "dare_ties": 0.1}  # method -> density


def worker_ours(args: argparse.Namespace) -> dict:
    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe

    inputs = [MergeInput(Path(p)) for p in args.inputs]
    recipe = Recipe(args.method, normalize=True)  # peft divides by the agreeing count
    start = time.perf_counter()
    merge_models(Path(args.base), inputs, recipe, Path(args.out), density=args.density)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def worker_peft(args: argparse.Namespace) -> dict:
    import itertools

    import torch
    from peft.utils import merge_utils
    from safetensors.torch import load_file, save_file

    from aggregator.methods import dare_drop

    start = time.perf_counter()
    base = load_file(Path(args.base) / "model.safetensors")
    models = [load_file(Path(p) / "model.safetensors") for p in args.inputs]  # sorted by id
    merged = {}
    for name in sorted(base):
        if args.method == "dare_ties" and args.mask == "ours":
            calls = itertools.count()

            def pruning(tensor, density, rescale, name=name, calls=calls):
                return dare_drop(tensor, density, next(calls), name)

            merge_utils.random_pruning = pruning
        tvs = [m[name] - base[name] for m in models]
        fn = merge_utils.ties if args.method == "ties" else merge_utils.dare_ties
        merged[name] = base[name] + fn(tvs, torch.ones(len(tvs)), args.density)
    save_file(merged, Path(args.out) / "model.safetensors")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


_MERGEKIT_RUN = """
import json, sys, time
from mergekit.scripts.run_yaml import main
start = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024}))
"""


def run_mergekit(mergekit: Path, base: Path, inputs: list[Path], out: Path, method: str) -> dict:
    """The same merge through mergekit's CLI, in its own Python (the one beside mergekit-yaml)."""
    density = METHODS[method]
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "models:"]
    for p in inputs:
        lines += [f"  - model: {p}", "    parameters:", f"      density: {density}"]
        lines += ["      weight: 1.0"]
    lines += ["parameters:", "  normalize: true"]
    config = out.parent / f"mergekit-{method}.yaml"
    config.write_text("\n".join(lines) + "\n")
    python = mergekit.parent / "python"
    cmd = [str(python), "-c", _MERGEKIT_RUN, str(config), str(out)]
    cmd += ["--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_mergekit(given: Path | None) -> Path | None:
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--mergekit {given}: no such file; give the path of mergekit-yaml")
        return given
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return beside if beside.is_file() else None


def run_worker(
    kind: str, base: Path, inputs: list[Path], out: Path, method: str, mask: str = "ours"
) -> dict:
    if kind == "peft":
        out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--base",
        str(base),
        "--out",
        str(out),
        "--mask",
        mask,
    ]
    cmd += ["--method", method, "--density", str(METHODS[method]), "--inputs", *map(str, inputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ours: Path, oracle: Path) -> dict:
    """Largest difference and count of entries outside fp32 tolerance, tensor by tensor."""
    from protocol.model_dir import ModelDir

    worst, outside, total = 0.0, 0, 0
    with ModelDir(ours) as a, ModelDir(oracle) as b:
        for name in a.names():
            x, y = a.tensor(name), b.tensor(name)
            diff = (x - y).abs()
            worst = max(worst, float(diff.max()))
            outside += int((diff > 1e-6 + 1e-5 * y.abs()).sum())
            total += x.numel()
    return {"max_abs_diff": worst, "outside_tolerance": outside, "entries": total}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="synthetic model size (1.0 = ~306M params)"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="numbers of inputs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--mergekit", type=Path, help="mergekit-yaml to compare with (default: one beside python)"
    )
    parser.add_argument(
        "--mergekit-k", type=int, nargs="*", default=[4], help="K at which mergekit runs"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--density", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--mask", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_ours(args) if args.worker == "ours" else worker_peft(args)))
        return 0

    from aggregator.inputs import open_source

    mergekit = find_mergekit(args.mergekit)
    params = sum(__import__("math").prod(s) for _, s in layout(args.scale))
    largest_mib = largest_params(args.scale) * 4 / 2**20
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        print(
            f"writing a base and {max(args.k)} fine-tunes of {params:,} params ...", file=sys.stderr
        )
        base = write_model(root / "base", args.scale)
        finetunes = [
            write_model(root / f"ft{i}", args.scale, delta_seed=i) for i in range(max(args.k))
        ]
        keys = {p: open_source(p).order_key for p in finetunes}
        for k in args.k:
            inputs = sorted(finetunes[:k], key=keys.__getitem__)  # the engine's order (masks)
            for method in args.methods:
                print(f"K={k} {method} ...", file=sys.stderr)
                ours = run_worker("ours", base, inputs, root / "ours", method)
                oracle = run_worker("peft", base, inputs, root / "peft", method)
                diff = compare(root / "ours", root / "peft")
                row = {"k": k, "method": method, "ours": ours, "peft": oracle, "diff": diff}
                if method == "dare_ties":  # peft as shipped draws its own (bernoulli) mask
                    row["peft_own_mask"] = run_worker(
                        "peft", base, inputs, root / "peft2", method, "peft"
                    )
                    shutil.rmtree(root / "peft2")
                if mergekit is not None and k in args.mergekit_k:
                    print(f"K={k} {method} with mergekit ...", file=sys.stderr)
                    row["mergekit"] = run_mergekit(mergekit, base, inputs, root / "mk", method)
                    if method == "ties":
                        row["mergekit_diff"] = compare(root / "ours", root / "mk")
                    shutil.rmtree(root / "mk")
                rows.append(row)
                for d in ("ours", "peft"):
                    shutil.rmtree(root / d)
    lines = [
        "# bench_merge: synthetic fp32 model, torch threads = cores",
        f"command: {' '.join(sys.argv)}",
        f"{params:,} params, largest tensor {largest_mib:.0f} MiB",
        "",
        "peft s / speed-up: peft with our DARE mask (the run whose result is compared);"
        " in brackets: peft as shipped, with its own bernoulli mask",
        "",
        "| K | method | ours s | ours Mparam/s | ours peak RSS MiB | RSS bound MiB | peft s | peft Mparam/s | peft peak RSS MiB | speed-up | max abs diff | entries outside fp32 tol |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = (r["k"] + 3) * largest_mib + 300
        o, p = r["ours"], r["peft"]
        own = r.get("peft_own_mask")
        peft_s = f"{p['seconds']:.1f}" + (f" [{own['seconds']:.1f}]" if own else "")
        speedup = f"{p['seconds'] / o['seconds']:.2f}x" + (
            f" [{own['seconds'] / o['seconds']:.2f}x]" if own else ""
        )
        lines.append(
            f"| {r['k']} | {r['method']} | {o['seconds']:.1f} | {params / o['seconds'] / 1e6:.1f} | "
            f"{o['peak_rss_mb']:.0f} | {bound:.0f} | {peft_s} | {params / p['seconds'] / 1e6:.1f} | "
            f"{p['peak_rss_mb']:.0f} | {speedup} | {r['diff']['max_abs_diff']:.2e} | "
            f"{r['diff']['outside_tolerance']:,} of {r['diff']['entries']:,} |"
        )
    mk_rows = [r for r in rows if "mergekit" in r]
    if mk_rows:
        lines += [
            "",
            "mergekit's CLI (mergekit-yaml, same config; dare_ties with its own random mask):",
            "",
            "| K | method | mergekit s | mergekit Mparam/s | mergekit peak RSS MiB | ours s | speed-up | max abs diff | entries outside fp32 tol |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for r in mk_rows:
        m, o, d = r["mergekit"], r["ours"], r.get("mergekit_diff")
        diff = (
            f"{d['max_abs_diff']:.2e} | {d['outside_tolerance']:,} of {d['entries']:,}"
            if d
            else "(own mask) | -"
        )
        lines.append(
            f"| {r['k']} | {r['method']} | {m['seconds']:.1f} | {params / m['seconds'] / 1e6:.1f} | "
            f"{m['peak_rss_mb']:.0f} | {o['seconds']:.1f} | {m['seconds'] / o['seconds']:.2f}x | {diff} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
