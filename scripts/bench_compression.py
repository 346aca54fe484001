"""Quality per byte: for each delta codec and drop rate, with and without error feedback, the
bytes per parameter a volunteer sends and the share of the gain those bytes keep.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_compression.py --model {tiny,smollm2-135m}
        [--rows CODEC:P[:topk][:ef] ...] [--settings single swarm] [--volunteers V]
        [--rounds R] [--round-steps H] [--reference EARLIER.json] [--json FILE] [--plot FILE]
    .venv/bin/python scripts/bench_compression.py --load RUN.json ... [--plot FILE]

docs/benchmarks.md has the commands and figures of the measured runs. (One torch thread
when anything else runs: two threads spinning against a busy core ran many times slower.)

One genesis, the demo's domains (node.demo.local_swarm, as scripts/bench_quality.py), and
two settings measured in the same run:

- ``single``: one volunteer fine-tunes R x H steps on the first domain; its delta, made with
  each row's codec and drop rate (through ``protocol.delta.create_delta``, the volunteer's
  own path), is applied to the genesis. ``retained_single`` = (genesis loss - loss with the
  delta) / (genesis loss - loss of the fine-tune), on that domain's held-out blocks.
- ``swarm``: V volunteers (one per domain) train H steps a round on the head, their deltas
  are averaged (``linear``, no outer optimizer) into the next head, R rounds, in one process
  (the trainer, the delta codec and the merge engine the daemons use, no network).
  ``retained_swarm`` = the row's gain in mean held-out loss over the genesis / the gain of
  the same swarm with dense float32 deltas (``fp32:0``, always run first).

A row is ``CODEC:P[:topk][:ef]``: the value codec, the DARE drop rate, ``topk`` for
magnitude selection instead of DARE (emulated: :func:`topk_delta`), and ``ef`` for error
feedback (what a delta leaves out is added to the volunteer's next one; its kept entries
are sent unscaled). ``bytes_per_param`` is the delta files' mean size over the parameters
they cover. With error feedback a single delta keeps less (it sends a tenth of the update at
p = 0.9 and holds the rest for a next round that the single setting does not have): its
``retained_single`` is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, when imported

from node.demo.domains import DOMAINS  # noqa: E402
from node.demo.local_swarm import (  # noqa: E402
    DEMO_MODELS,
    domain_losses,
    eval_sets,
    make_genesis,
    save_trained,
    write_domain_data,
)
from protocol.constants import CODEC_NAMES  # noqa: E402

Losses = dict[str, float]
DENSE = "fp32:0"
# the grid run when --rows is not given: the default (int4:0.8) and the former one
# (bf16:0.9), then each codec near 0.15 and 0.02 bytes per parameter, with and without error
# feedback, and magnitude selection at about the default's bytes
DEFAULT_ROWS = [
    "int4:0.8", "int4:0.8:ef", "int4:0.97", "int4:0.97:ef",
    "bf16:0.9", "bf16:0.9:ef", "bf16:0.99",
    "int8:0.85", "sign:0", "sign:0.9", "int4:0.9:topk",
]  # fmt: skip


@dataclass(frozen=True)
class Row:
    codec: str
    drop_rate: float
    feedback: bool
    topk: bool = False  # the largest entries, their positions sent (emulated, see topk_delta)

    @property
    def label(self) -> str:
        return (
            f"{self.codec}:{self.drop_rate:g}"
            + (":topk" if self.topk else "")
            + (":ef" if self.feedback else "")
        )


def parse_row(text: str) -> Row:
    parts = text.split(":")
    try:
        codec, p = parts[0], float(parts[1])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CODEC:P[:topk][:ef]") from None
    flags = parts[2:]
    if (
        codec not in CODEC_NAMES
        or not 0 <= p < 1
        or flags not in ([], ["ef"], ["topk"], ["topk", "ef"])
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected CODEC:P[:topk][:ef], CODEC one of {', '.join(CODEC_NAMES)}, "
            "0 <= P < 1"
        )
    return Row(codec, p, "ef" in flags, "topk" in flags)


def mean(losses: Losses) -> float:
    return sum(losses.values()) / len(losses)


def params_of(model_dir: Path) -> int:
    from protocol.model_dir import FLOAT_DTYPES, ModelDir

    with ModelDir(model_dir) as md:
        return sum(math.prod(i.shape) for i in md.tensors.values() if i.dtype in FLOAT_DTYPES)


def make_delta(head: Path, weights, out: Path, row: Row, seed: int, carry=None):
    """A delta as a volunteer makes it; (file size, what it left out or None)."""
    from protocol.delta import TensorMap, create_delta
    from protocol.identity import Identity

    if row.topk:
        return topk_delta(head, weights, out, row, carry)
    left = {} if row.feedback else None
    create_delta(head, TensorMap(weights), out, identity=Identity.generate(),
                 drop_rate=row.drop_rate, codec=row.codec, seed=seed, carry=carry,
                 left=left)  # fmt: skip
    return out.stat().st_size, left


def topk_delta(head: Path, weights, out: Path, row: Row, carry=None):
    """Magnitude selection, emulated: of each tensor's target (the delta, plus ``carry`` with
    error feedback), the largest 1 - p of the entries by magnitude, their values through the
    row's codec. The wire has no such sparsifier yet; the bytes it would take are counted as
    a zstd frame of the codec's encoding of the values plus a zstd frame of the positions as a
    bitmap (a bit per entry; zstd brings a sparse one near its entropy), and the file written
    is a dense float32 delta holding exactly what a reader would decode, which the merge then
    reads as it would. Returns (bytes, what it left out or None), like :func:`make_delta`."""
    import numpy as np
    import torch

    from protocol import frames
    from protocol.codecs import get_codec
    from protocol.container import DeltaWriter
    from protocol.identity import Identity
    from protocol.ids import base_id
    from protocol.model_dir import FLOAT_DTYPES, ModelDir

    codec = get_codec(row.codec)
    size, left = 0, ({} if row.feedback else None)
    with ModelDir(head) as md, DeltaWriter(out, base_id=base_id(head), identity=Identity.generate(),
                                           drop_rate=0.0, seed=0, codec="fp32") as writer:  # fmt: skip
        for name in md.names():
            info = md.tensors[name]
            if info.dtype not in FLOAT_DTYPES:
                continue
            target = weights[name].float() - md.tensor(name).float()
            if carry is not None and name in carry:
                target += carry[name]
            flat = target.reshape(-1)
            k = max(1, round((1 - row.drop_rate) * flat.numel()))
            index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            encoded = codec.encode(flat[index].numpy())
            bitmap = np.zeros(flat.numel(), bool)
            bitmap[index.numpy()] = True
            size += len(frames.compress(encoded)) + len(frames.compress(np.packbits(bitmap)))
            sent = torch.zeros_like(flat)
            sent[index] = torch.from_numpy(codec.decode(encoded, k))
            writer.add(name, info.dtype, sent.reshape(target.shape))
            if left is not None:
                left[name] = target - sent.reshape(target.shape)
        writer.finish()
    return size, left


def single(genesis, data, options, steps, rows, work, evals) -> dict[str, dict]:
    """Each row's delta of one fine-tune, applied to the genesis."""
    from transformers import AutoTokenizer

    from node.training.data import load_dataset
    from node.training.trainer import Trainer
    from protocol.delta import apply_deltas

    domain = next(iter(data))
    tokenizer = AutoTokenizer.from_pretrained(genesis)
    trainer = Trainer(genesis, load_dataset([data[domain]], tokenizer, seq_len=options.seq_len),
                      options)  # fmt: skip
    print(f"single: {steps} steps on {domain}", flush=True)
    trainer.train_round(max_steps=steps, max_seconds=None)
    weights = trainer.trained_weights()
    tuned = save_trained(trainer, genesis, work / "single-tuned")
    del trainer
    only = {domain: evals[domain]}
    before = domain_losses(genesis, only)[domain]
    gain = before - domain_losses(tuned, only)[domain]
    params = params_of(genesis)
    out = {}
    for row in rows:
        delta = work / "single.msd"
        size, _ = make_delta(genesis, weights, delta, row, seed=1)
        child = apply_deltas(genesis, [delta], work / "single-child")
        kept = (before - domain_losses(child, only)[domain]) / gain
        out[row.label] = {"bytes_per_param": size / params, "retained_single": kept}
        print(f"  {row.label:>14}: {size / params:.4f} bytes/param, keeps {kept:.3f}", flush=True)
        shutil.rmtree(child)
    shutil.rmtree(tuned)
    return out


def swarm(genesis, data, options, rounds, steps, row: Row, work, evals) -> tuple[Losses, float]:
    """The swarm's rounds with ``row``'s deltas (bench_common.swarm_rounds, merged by plain
    averaging): (final held-out losses, mean bytes/param)."""
    from bench_common import swarm_rounds
    from transformers import AutoTokenizer

    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe
    from node.training.data import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(genesis)
    datasets = {d: load_dataset([p], tokenizer, seq_len=options.seq_len) for d, p in data.items()}
    sizes: list[int] = []
    carried: dict[str, dict | None] = dict.fromkeys(data)  # what error feedback carries

    def delta(head, weights, out, domain, seed):
        size, carried[domain] = make_delta(head, weights, out, row, seed, carried[domain])
        sizes.append(size)

    def merge(r, head, deltas, child):
        merge_models(head, [MergeInput(p) for p in deltas], Recipe("linear"), child)

    head = swarm_rounds(genesis, datasets, options, rounds, steps, work, make_delta=delta,
                        merge=merge)  # fmt: skip
    losses = domain_losses(head, evals)
    shutil.rmtree(work)
    return losses, sum(sizes) / len(sizes) / params_of(genesis)


def plot(path: Path, rows: dict[str, dict], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, marker, name in (("retained_swarm", "o", "swarm"), ("retained_single", "x", "single")):
        points = sorted(
            (r["bytes_per_param"], r[key], label)
            for label, r in rows.items()
            if r.get(key) is not None
        )
        if not points:
            continue
        dots = ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker,
                          label=f"{name} (frontier labelled)")  # fmt: skip
        frontier, best = [], float("-inf")
        for x, y, label in points:  # fewest bytes first: a point is on it if it keeps more
            if y > best:
                frontier.append((x, y))
                best = y
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], linewidth=1,
                color=dots.get_facecolor()[0])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("bytes per parameter (log)")
    ax.set_ylabel("share of the gain kept")
    ax.axhline(0.97, color="grey", linewidth=0.5, linestyle=":")
    ax.axvline(0.15, color="grey", linewidth=0.5, linestyle=":")
    ax.set_title(f"Quality per byte, {model}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reference_row(path: Path, model: str, settings: dict) -> dict:
    """The dense swarm's row (its final mean loss, its bytes) from an earlier run of the same
    model and settings (the swarm is deterministic on one machine: the same genesis, data
    order and seeds)."""
    earlier = json.loads(path.read_text())
    ran = {k: earlier["settings"].get(k) for k in settings}
    if earlier["model"] != model or ran != settings:
        raise SystemExit(f"{path}: another model or other settings than this run's")
    try:
        row = earlier["rows"][DENSE]
        return {"bytes_per_param": row["bytes_per_param"], "swarm_loss": row["swarm_loss"]}
    except KeyError:
        raise SystemExit(f"{path}: no swarm row {DENSE} to take the reference from") from None


def report(rows: dict[str, dict]) -> None:
    print("| row | bytes/param | retained (single) | retained (swarm) |\n|---|---|---|---|")
    for label, r in rows.items():
        single_kept, swarm_kept = r.get("retained_single"), r.get("retained_swarm")
        print(f"| {label} | {r['bytes_per_param']:.4f} | "
              f"{'-' if single_kept is None else f'{single_kept:.3f}'} | "
              f"{'-' if swarm_kept is None else f'{swarm_kept:.3f}'} |")  # fmt: skip


def load(paths: list[Path]) -> tuple[str, dict[str, dict]]:
    """The rows of runs saved by --json, of one model, merged: a row's figures from the last
    run that has them (each retained share is against the reference of its own run)."""
    model, rows = None, {}
    for path in paths:
        run = json.loads(path.read_text())
        if model not in (None, run["model"]):
            raise SystemExit(f"{path}: a run of {run['model']}, the others are of {model}")
        model = run["model"]
        for label, figures in run["rows"].items():
            rows[label] = rows.get(label, {}) | figures
    return model, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="tiny")
    parser.add_argument("--rows", nargs="+", type=parse_row, metavar="CODEC:P[:topk][:ef]",
                        help=f"default: {' '.join(DEFAULT_ROWS)}")  # fmt: skip
    parser.add_argument("--settings", nargs="+", choices=("single", "swarm"),
                        default=["single", "swarm"])  # fmt: skip
    parser.add_argument("--volunteers", type=int, help="swarm: V (default: every domain)")
    parser.add_argument("--rounds", type=int, default=3, help="R (default 3)")
    parser.add_argument("--round-steps", type=int, help="H (default: the model's)")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="tiny: genesis steps")
    parser.add_argument("--reference", type=Path, metavar="JSON",
                        help="take the dense swarm's loss from this earlier --json of the same "
                        "model and settings instead of running it again")  # fmt: skip
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--plot", type=Path, help="retained against bytes/param (PNG)")
    parser.add_argument("--load", type=Path, nargs="+", metavar="JSON",
                        help="report (and --plot) runs saved by --json instead of running")  # fmt: skip
    args = parser.parse_args(argv)
    if args.load:
        name, rows = load(args.load)
        report(rows)
        if args.plot:
            plot(args.plot, rows, name)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = DEMO_MODELS[args.model]
    options = model.train
    steps = args.round_steps or model.round_steps
    rows = args.rows or [parse_row(t) for t in DEFAULT_ROWS]
    rows = [parse_row(DENSE), *[r for r in rows if r.label != DENSE]]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    domains = list(DOMAINS)[: args.volunteers or len(DOMAINS)]
    data = write_domain_data(work, domains)
    genesis = make_genesis(model, work / "genesis", data, args.pretrain_steps, print)
    evals = eval_sets(genesis, data)
    results: dict[str, dict] = {r.label: {} for r in rows}
    if "single" in args.settings:
        for label, figures in single(
            genesis, data, options, args.rounds * steps, rows, work, evals
        ).items():
            results[label] |= figures
    settings = {"volunteers": len(domains), "rounds": args.rounds, "round_steps": steps,
                "train": options.model_dump()}  # fmt: skip
    if "swarm" in args.settings:
        start = mean(domain_losses(genesis, evals))
        earlier = reference_row(args.reference, model.name, settings) if args.reference else None
        dense = earlier["swarm_loss"] if earlier else None
        print(f"swarm: {len(domains)} volunteers x {args.rounds} rounds x {steps} steps")
        for row in rows:
            if row.label == DENSE and earlier is not None:
                results[row.label] |= earlier | {"retained_swarm": 1.0}
                print(f"  {row.label:>14}: from {args.reference} (mean loss {dense:.4f})")
                continue
            losses, per_param = swarm(
                genesis, data, options, args.rounds, steps, row, work / "swarm", evals
            )
            dense = mean(losses) if row.label == DENSE else dense
            kept = (start - mean(losses)) / (start - dense)
            results[row.label] |= {"bytes_per_param": per_param, "retained_swarm": kept,
                                   "swarm_loss": mean(losses)}  # fmt: skip
            print(f"  {row.label:>14}: {per_param:.4f} bytes/param, keeps {kept:.3f} "
                  f"(mean loss {mean(losses):.4f})", flush=True)  # fmt: skip
    seconds = time.monotonic() - started
    print(f"\n# bench_compression: {model.name}, {seconds:.0f} s")
    report(results)
    if args.json:
        blob = {"model": model.name, "settings": settings, "rows": results,
                "seconds": round(seconds, 1)}  # fmt: skip
        args.json.write_text(json.dumps(blob, indent=2))
    if args.plot:
        plot(args.plot, results, model.name)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
