"""``mergeswarm merge CONFIG.yaml -o OUT_DIR``: an offline merge from a mergekit-style config."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tunes, .msd deltas or LoRA adapters into a base (mergekit YAML)",
        description="Merge with a mergekit-style YAML config (merge_method: ties | dare_ties | "
        "dare_linear | task_arithmetic | linear). Inputs may also be .msd deltas or LoRA adapters.",
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the merge config")
    p.add_argument("-o", "--output", type=Path, metavar="OUT_DIR", help="directory to create")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and inputs (paths, shapes, dtypes, base ids) without writing",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.config import ConfigError, load_config
    from aggregator.engine import merge_models
    from protocol.model_dir import ModelDir

    if args.output is None and not args.dry_run:
        raise ConfigError("give -o OUT_DIR (or --dry-run to only check the config)")
    config = load_config(args.config)
    inputs = config.inputs()
    base = Path(config.base_model).expanduser().resolve()
    with common.byte_progress("merge") as bar:
        bar.total = ModelDir(base).nbytes
        report = merge_models(
            base,
            inputs,
            config.recipe(),
            args.output,
            density=config.default_density(),
            dtype=config.output_dtype,
            dry_run=args.dry_run,
            progress=bar.update,
        )
    print(f"{config.merge_method} of {len(inputs)} input(s) into base {report.base_id}")
    for row in report.inputs:
        key = row.get("id") or row["fingerprint"]
        print(
            f"  {row['kind']:<5} {key[:16]}  weight {row['weight']:g}  density {row['density']:g}  {row['path']}"
        )
    if args.dry_run:
        print("dry run: config and inputs are valid; nothing written")
    else:
        print(f"wrote {args.output}: base {report.child_id} in {report.seconds:.1f} s")
    return 0
