#!/usr/bin/env python
"""What the outer optimizer costs an aggregator per round: merge time and momentum bytes.

Merges K fine-tunes of a synthetic Llama-shaped fp32 model (scale 0.44: about
SmolLM2-135M's 135M parameters) with ``linear`` in one process, three ways, in the
same run: no outer step (the baseline), the chain's first Nesterov step (no previous
momentum) and a later one (reading the previous momentum, writing the next). Each
runs --repeat times after one warm-up merge; the median is reported.

    .venv/bin/python scripts/bench_outer.py [--scale 0.44] [--k 4] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import layout, write_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.44, help="model size (1.0: 306M)")
    parser.add_argument("--k", type=int, default=4, help="fine-tunes merged per round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe
    from aggregator.outer import OuterStep

    params = sum(math.prod(shape) for _, shape in layout(args.scale))
    work = Path(tempfile.mkdtemp(prefix="mergeswarm-bench-outer-"))
    base = write_model(work / "base", args.scale)
    inputs = [
        MergeInput(write_model(work / f"ft{i}", args.scale, delta_seed=i)) for i in range(args.k)
    ]
    print(f"{params:,} parameters, {args.k} fine-tunes, linear merge; {work}")
    seed_step = OuterStep(0.7, 0.9, None, work / "momentum-0")
    merge_models(base, inputs, Recipe("linear"), work / "seed", outer=seed_step)
    cases = {
        "no outer step": lambda out: None,
        "nesterov, first step": lambda out: OuterStep(0.7, 0.9, None, out / "m"),
        "nesterov, with momentum": lambda out: OuterStep(0.7, 0.9, seed_step.out, out / "m"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for n in range(args.repeat + 1):  # run 0 warms the page cache and the allocator
        for name, make in cases.items():
            out = work / f"run-{n}-{len(seconds[name])}-{name[:8].replace(' ', '')}"
            out.mkdir()
            started = time.perf_counter()
            merge_models(base, inputs, Recipe("linear"), out / "child", outer=make(out))
            if n:
                seconds[name].append(time.perf_counter() - started)
            shutil.rmtree(out)
    momentum_bytes = seed_step.out.stat().st_size
    baseline = statistics.median(seconds["no outer step"])
    rows = {}
    print("\n| round's merge | seconds (median) | x baseline |")
    print("|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        rows[name] = {"seconds": round(median, 3), "ratio": round(median / baseline, 3)}
        print(f"| {name} | {median:.2f} | {median / baseline:.2f} |")
    print(f"\nmomentum blob: {momentum_bytes:,} bytes ({momentum_bytes / params:.3f} bytes/param)")
    if args.json:
        result = {"params": params, "k": args.k, "rows": rows, "momentum_bytes": momentum_bytes}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
