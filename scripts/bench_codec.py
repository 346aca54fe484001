#!/usr/bin/env python
"""Benchmark the .msd delta format against two baselines measured in the same run.

For each drop rate p and codec: container bytes per parameter, encode and
decode throughput (MB/s of float32 input, one core) and peak RSS of a fresh
process doing only that, next to

  (a) the dense fp32 delta as safetensors + zstd, and
  (b) sparse COO: int32 indices + fp16 values of the same DARE survivors, + zstd.

Inputs: a synthetic ~300M-parameter fp32 Llama-shaped model (147 tensors, the
largest 50.3M) whose deltas are drawn per tensor from N(0, 1e-3^2), and a real
delta from fine-tuning a tiny model for a few steps.

    .venv/bin/python scripts/bench_codec.py                # full run, ~5 minutes
    .venv/bin/python scripts/bench_codec.py --scale 0.02   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import delta_tensors, largest_params, peak_rss_mb

ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "sign")
DROP_RATES = (0.5, 0.9, 0.99)


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- workers (fresh processes)


def synthetic_tensors(scale: float):
    return delta_tensors(scale, seed=0)


def real_tensors(src: Path):
    from protocol.model_dir import ModelDir

    base, ft = ModelDir(src / "base"), ModelDir(src / "finetuned")
    for name in base.names():
        yield name, ft.tensor(name) - base.tensor(name)


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from protocol.container import DeltaReader, DeltaWriter
    from protocol.identity import Identity

    idle_rss = rss_now_mb()
    tensors = real_tensors(Path(args.source)) if args.source else synthetic_tensors(args.scale)
    out = Path(args.file)
    busy = 0.0
    params = 0
    if args.worker == "encode":
        writer = DeltaWriter(
            out,
            base_id="0" * 64,
            identity=Identity.generate(),
            drop_rate=args.p,
            seed=1,
            codec=args.codec,
        )
        for name, t in tensors:
            params += t.numel()
            start = time.perf_counter()
            writer.add(name, "F32", t)
            busy += time.perf_counter() - start
            del t
        start = time.perf_counter()
        writer.finish()
        busy += time.perf_counter() - start
    elif args.worker == "decode":
        start = time.perf_counter()
        with DeltaReader(out) as reader:
            for name in reader.names():
                params += int(reader.read_tensor(name).numel())
        busy = time.perf_counter() - start
    elif args.worker in ("dense-encode", "coo-encode"):
        busy, params = baseline_encode(args, tensors, out, np, torch)
    elif args.worker in ("dense-decode", "coo-decode"):
        busy, params = baseline_decode(args, out, np, torch)
    return {
        "seconds": busy,
        "params": params,
        "bytes": out.stat().st_size,
        "peak_rss_mb": peak_rss_mb(),
        "idle_rss_mb": idle_rss,
    }


def _frame_writer(out: Path):
    """Length-prefixed zstd frames: the baselines' container."""
    import struct

    import zstandard

    f = open(out, "wb")  # noqa: SIM115 - closed by the caller
    cctx = zstandard.ZstdCompressor(level=3)

    def put(payload: bytes) -> None:
        frame = cctx.compress(payload)
        f.write(struct.pack("<Q", len(frame)))
        f.write(frame)

    return f, put


def _frames(out: Path):
    import struct

    import zstandard

    dctx = zstandard.ZstdDecompressor()
    with open(out, "rb") as f:
        while head := f.read(8):
            yield dctx.decompress(f.read(struct.unpack("<Q", head)[0]))


def baseline_encode(args, tensors, out, np, torch):
    from safetensors.torch import save

    from protocol import dare

    f, put = _frame_writer(out)
    busy, params = 0.0, 0
    with f:
        for name, t in tensors:
            params += t.numel()
            start = time.perf_counter()
            if args.worker == "dense-encode":
                put(save({name: t.contiguous()}))
            else:
                flat = t.reshape(-1).numpy()
                idx = np.flatnonzero(dare.keep_mask(1, name, flat.size, args.p)).astype("<i4")
                vals = flat[idx].astype("<f2")
                put(json.dumps({"name": name, "shape": list(t.shape), "n": int(idx.size)}).encode())
                put(idx.tobytes() + vals.tobytes())
            busy += time.perf_counter() - start
    return busy, params


def baseline_decode(args, out, np, torch):
    from safetensors.torch import load

    start = time.perf_counter()
    params = 0
    frames = _frames(out)
    for payload in frames:
        if args.worker == "dense-decode":
            params += sum(t.numel() for t in load(payload).values())
            continue
        meta = json.loads(payload)
        body = next(frames)
        n = meta["n"]
        idx = np.frombuffer(body, "<i4", count=n)
        vals = np.frombuffer(body, "<f2", offset=4 * n).astype(np.float32)
        dense = np.zeros(int(np.prod(meta["shape"])), np.float32)
        dense[idx] = vals
        params += torch.from_numpy(dense).reshape(meta["shape"]).numel()
    return time.perf_counter() - start, params


# ---------------------------------------------------------------- driver


def run_worker(
    kind: str, file: Path, *, p: float, codec: str, scale: float, source: Path | None
) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--file", str(file), "--p", str(p)]
    cmd += ["--codec", codec, "--scale", str(scale)]
    if source is not None:
        cmd += ["--source", str(source)]
    env = {**os.environ, **ONE_CORE}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_real_delta(workdir: Path) -> Path:
    """A tiny model and a short fine-tune of it: the source of a real delta."""
    from transformers.utils import logging as hf_logging

    from node.training.finetune import quick_finetune
    from node.training.tiny_model import CORPUS, build_tiny_model

    hf_logging.disable_progress_bar()

    src = workdir / "real"
    build_tiny_model(src / "base", hidden_size=256, layers=4, intermediate_size=704, seed=0)
    quick_finetune(src / "base", src / "finetuned", CORPUS, steps=8, lr=1e-4)
    return src


def value_bytes(codec: str, kept: int) -> float:
    from protocol.codecs import get_codec

    return get_codec(codec).encoded_size(kept) / max(kept, 1)


def measure(args: argparse.Namespace, workdir: Path, source: Path | None, label: str) -> dict:
    results: dict = {"label": label, "rows": []}
    largest = 0
    if source is None:
        largest = largest_params(args.scale)
    dense_file = workdir / f"{label}-dense.bin"
    enc = run_worker(
        "dense-encode", dense_file, p=0.0, codec="fp32", scale=args.scale, source=source
    )
    dec = run_worker(
        "dense-decode", dense_file, p=0.0, codec="fp32", scale=args.scale, source=source
    )
    params = enc["params"]
    results["params"] = params
    results["dense"] = {"enc": enc, "dec": dec}
    for p in args.p:
        coo_file = workdir / f"{label}-coo-{p}.bin"
        coo = {
            "enc": run_worker(
                "coo-encode", coo_file, p=p, codec="fp16", scale=args.scale, source=source
            ),
            "dec": run_worker(
                "coo-decode", coo_file, p=p, codec="fp16", scale=args.scale, source=source
            ),
        }
        for codec in args.codecs:
            f = workdir / f"{label}-{p}-{codec}.msd"
            enc = run_worker("encode", f, p=p, codec=codec, scale=args.scale, source=source)
            dec = run_worker("decode", f, p=p, codec=codec, scale=args.scale, source=source)
            from protocol.container import DeltaReader

            with DeltaReader(f) as r:
                kept = r.header.kept
            results["rows"].append(
                {"p": p, "codec": codec, "kept": kept, "enc": enc, "dec": dec, "coo": coo}
            )
            f.unlink()
        coo_file.unlink()
    dense_file.unlink()
    results["largest_tensor_mb"] = largest * 4 / 2**20
    return results


def report(res: dict) -> list[str]:
    params = res["params"]
    mb = params * 4 / 1e6
    dense = res["dense"]
    lines = [
        f"\n## {res['label']}: {params:,} params"
        + (
            f", largest tensor {res['largest_tensor_mb']:.0f} MiB"
            if res["largest_tensor_mb"]
            else ""
        ),
        "",
        f"Baseline (a) dense fp32 safetensors + zstd: {dense['enc']['bytes'] / params:.3f} bytes/param, "
        f"encode {mb / dense['enc']['seconds']:.0f} MB/s, decode {mb / dense['dec']['seconds']:.0f} MB/s",
        "",
        "| p | codec | bytes/param | vs ideal | x smaller than fp32 | COO bytes/param | vs COO | encode MB/s | decode MB/s | peak RSS enc/dec MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        size = row["enc"]["bytes"]
        ideal = row["kept"] * value_bytes(row["codec"], row["kept"])
        coo_bytes = row["coo"]["enc"]["bytes"]
        lines.append(
            f"| {row['p']} | {row['codec']} | {size / params:.4f} | {size / ideal:.3f} | "
            f"{4 * params / size:.1f} | {coo_bytes / params:.4f} | {size / coo_bytes:.2f} | "
            f"{mb / row['enc']['seconds']:.0f} | {mb / row['dec']['seconds']:.0f} | "
            f"{row['enc']['peak_rss_mb']:.0f} / {row['dec']['peak_rss_mb']:.0f} |"
        )
    return lines


def check_targets(res: dict) -> list[str]:
    """The issue's targets, as PASS/FAIL lines (synthetic model only)."""
    params, out = res["params"], []
    mb = params * 4 / 1e6
    rss_limit = 4 * res["largest_tensor_mb"] + 300

    def verdict(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    for row in res["rows"]:
        size, tag = row["enc"]["bytes"], f"p={row['p']} {row['codec']}"
        ideal = row["kept"] * value_bytes(row["codec"], row["kept"])
        verdict(
            size <= 1.05 * ideal,
            f"{tag}: bytes {size / ideal:.3f}x of kept x value bytes (<= 1.05)",
        )
        verdict(
            size < row["coo"]["enc"]["bytes"],
            f"{tag}: smaller than COO ({size / row['coo']['enc']['bytes']:.2f}x)",
        )
        for phase in ("enc", "dec"):
            speed = mb / row[phase]["seconds"]
            verdict(speed >= 300, f"{tag}: {phase}ode {speed:.0f} MB/s (>= 300)")
            peak = row[phase]["peak_rss_mb"]
            verdict(
                peak <= rss_limit, f"{tag}: {phase}ode peak RSS {peak:.0f} MiB (<= {rss_limit:.0f})"
            )
        if row["p"] == 0.9 and row["codec"] == "bf16":
            verdict(size / params <= 0.21, f"{tag}: {size / params:.4f} bytes/param (<= 0.21)")
            verdict(
                4 * params / size >= 19,
                f"{tag}: {4 * params / size:.1f}x smaller than dense fp32 (>= 19)",
            )
        if row["p"] == 0.9 and row["codec"] == "int8":
            verdict(size / params <= 0.11, f"{tag}: {size / params:.4f} bytes/param (<= 0.11)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="synthetic model size (1.0 = ~303M params)"
    )
    parser.add_argument("--p", type=float, nargs="+", default=list(DROP_RATES), help="drop rates")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument("--skip-real", action="store_true", help="skip the real fine-tuned delta")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.p = float(args.p[0])
        print(json.dumps(worker(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as tmp:
        workdir = Path(tmp)
        results = [measure(args, workdir, None, "synthetic")]
        if not args.skip_real:
            results.append(measure(args, workdir, make_real_delta(workdir), "real fine-tune delta"))
    from protocol.frames import DEFAULT_LEVEL

    lines = [
        f"# bench_codec: one core, zstd level {DEFAULT_LEVEL}",
        f"command: {' '.join(sys.argv)}",
    ]
    for res in results:
        lines += report(res)
    targets = check_targets(results[0])
    lines += ["", "## Targets (synthetic model)", *targets]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
