"""``mergeswarm base-id`` and ``mergeswarm delta create|inspect|apply``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.constants import CODEC_NAMES, DEFAULT_CODEC, DEFAULT_DROP_RATE

from . import common

if TYPE_CHECKING:
    from protocol.container import DeltaReader


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("base-id", help="print the content id of a model directory")
    p.add_argument("model_dir", type=Path, metavar="DIR", help="Hugging Face model directory")
    p.set_defaults(run=run_base_id)

    delta = sub.add_parser("delta", help="create, inspect and apply .msd deltas")
    dsub = delta.add_subparsers(dest="delta_command", required=True, metavar="ACTION")

    p = dsub.add_parser(
        "create",
        help="write finetuned - base as a DARE-sparse, signed .msd",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--base", type=Path, required=True, metavar="DIR", help="the base model directory"
    )
    p.add_argument(
        "--finetuned",
        type=Path,
        required=True,
        metavar="DIR",
        help="the fine-tuned model directory",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT.msd", help="file to write"
    )
    p.add_argument(
        "--drop-rate",
        type=common.drop_rate,
        default=DEFAULT_DROP_RATE,
        help=f"DARE drop rate p in [0, 1) (default {DEFAULT_DROP_RATE})",
    )
    p.add_argument("--seed", type=common.seed, default=None, help="DARE seed (default: random)")
    p.add_argument(
        "--codec",
        choices=sorted(CODEC_NAMES),
        default=DEFAULT_CODEC,
        help=f"value codec (default {DEFAULT_CODEC})",
    )
    p.add_argument(
        "--block-size",
        type=common.block_size,
        default=None,
        help="int8/int4/sign codecs: values per scale (default 128 for int8, 64 for int4, "
        "256 for sign)",
    )
    p.add_argument(
        "--key",
        type=Path,
        default=None,
        help=f"Ed25519 key file, created if absent (default: $MERGESWARM_DATA_DIR/identity.pem, now {common.default_key_path()})",
    )
    p.add_argument(
        "--meta",
        action="append",
        type=common.key_value,
        default=[],
        metavar="KEY=VALUE",
        help="training metadata to record (repeatable)",
    )
    p.set_defaults(run=run_create)

    p = dsub.add_parser("inspect", help="show a delta's ids, parameters and tensors")
    p.add_argument("file", type=Path, metavar="FILE", help="a .msd file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--verify",
        type=Path,
        default=None,
        metavar="BASE_DIR",
        help="also check the delta fits this base and decode every tensor (hashes, sizes, finiteness, mask counts)",
    )
    p.set_defaults(run=run_inspect)

    p = dsub.add_parser("apply", help="write base + deltas as a new model directory")
    p.add_argument(
        "--base", type=Path, required=True, metavar="DIR", help="the base model directory"
    )
    p.add_argument(
        "files", type=Path, nargs="+", metavar="FILE", help=".msd deltas made against the base"
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory to create"
    )
    p.set_defaults(run=run_apply)


# The protocol modules load torch: imported by the commands that run, so `--help` stays fast.


def run_base_id(args: argparse.Namespace) -> int:
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir

    md = ModelDir(args.model_dir)
    with common.byte_progress("hashing") as bar:
        bar.total = md.nbytes
        print(base_id(md, bar.update))
    return 0


def run_create(args: argparse.Namespace) -> int:
    from protocol.codecs import get_codec
    from protocol.delta import create_delta
    from protocol.errors import EncodeError
    from protocol.identity import Identity
    from protocol.model_dir import ModelDir

    try:
        get_codec(args.codec, args.block_size)  # int4 takes only even blocks, sign multiples of 8
    except ValueError as exc:
        raise EncodeError(f"--block-size {args.block_size}: {exc}") from None
    identity = Identity.load_or_create(args.key or common.default_key_path())
    with common.byte_progress("delta") as bar:
        bar.total = ModelDir(args.base).nbytes
        delta_id, header = create_delta(
            args.base,
            args.finetuned,
            args.output,
            identity=identity,
            drop_rate=args.drop_rate,
            seed=args.seed,
            codec=args.codec,
            block_size=args.block_size,
            metadata=dict(args.meta),
            progress=bar.update,
        )
    size = os.path.getsize(args.output)
    print(
        f"wrote {args.output}: delta {delta_id}, {header.kept:,} of {header.params:,} values kept, "
        f"{size:,} bytes ({size / max(header.params, 1):.4f} bytes/param)"
    )
    return 0


def describe(reader: DeltaReader) -> dict[str, Any]:
    from protocol.ids import file_id

    """The facts ``delta inspect`` shows, as plain JSON-able data."""
    h = reader.header
    size = reader.path.stat().st_size
    return {
        "delta_id": file_id(reader.path),
        "kind": h.kind,
        "base_id": h.base_id,
        "author": h.author,
        "drop_rate": h.sparsifier.drop_rate,
        "seed": h.sparsifier.seed,
        "prf": h.sparsifier.prf,
        "codec": h.codec.name,
        "block_size": h.codec.block_size,
        "params": h.params,
        "kept": h.kept,
        "kept_fraction": h.kept / h.params if h.params else 0.0,
        "bytes": size,
        "bytes_per_param": size / h.params if h.params else 0.0,
        "metadata": h.metadata,
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": t.shape,
                "kept": t.kept,
                "frame_bytes": t.frame_bytes,
            }
            for t in h.tensors
        ],
    }


def run_inspect(args: argparse.Namespace) -> int:
    from protocol.container import DeltaReader
    from protocol.delta import check_fits
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir

    with DeltaReader(args.file) as reader:
        if args.verify:
            # Shapes are checked against the base first: that bounds every allocation.
            base = ModelDir(args.verify)
            check_fits(reader, base, base_id(base))
            for name in reader.names():
                reader.read_tensor(name)
        info = describe(reader)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    rows = [
        ("delta id", info["delta_id"]),
        ("base id", info["base_id"]),
        ("author", info["author"]),
        ("DARE", f"p={info['drop_rate']} seed={info['seed']} ({info['prf']})"),
        (
            "codec",
            info["codec"] + (f" block={info['block_size']}" if info["block_size"] else ""),
        ),
        ("params", f"{info['params']:,}"),
        ("kept", f"{info['kept']:,} ({info['kept_fraction']:.4f})"),
        ("bytes", f"{info['bytes']:,} ({info['bytes_per_param']:.4f} bytes/param)"),
        (
            "verified",
            f"fits {args.verify}; all tensors decoded" if args.verify else "header and signature",
        ),
    ]
    rows += [
        (f"meta {_printable(k)}", _printable(json.dumps(v))) for k, v in info["metadata"].items()
    ]
    for key, value in rows:
        print(f"{key:>10}: {value}")
    names = [_printable(t["name"]) for t in info["tensors"]]
    width = max((len(n) for n in names), default=4)
    print(f"\n{'tensor':<{width}}  {'dtype':<5} {'shape':<16} {'kept':>12} {'bytes':>12}")
    for name, t in zip(names, info["tensors"], strict=True):
        shape = "x".join(map(str, t["shape"])) or "scalar"
        print(
            f"{name:<{width}}  {t['dtype']:<5} {shape:<16} {t['kept']:>12,} {t['frame_bytes']:>12,}"
        )
    return 0


def _printable(text: str) -> str:
    """Names come from other peers: never let them drive the terminal."""
    return text if text.isprintable() else repr(text)


def run_apply(args: argparse.Namespace) -> int:
    from protocol.delta import apply_deltas
    from protocol.model_dir import ModelDir

    with common.byte_progress("apply") as bar:
        bar.total = 2 * ModelDir(args.base).nbytes  # hash pass + write pass
        out = apply_deltas(args.base, args.files, args.output, progress=bar.update)
    print(f"wrote {out}: base {args.base} + {len(args.files)} delta(s)")
    return 0
