"""Does merge-training work? The fraction of joint training's gain the swarm reaches at equal
compute, from one genesis in one run, on held-out text of four domains.

    .venv/bin/python scripts/bench_quality.py --model smollm2-135m [--rounds 3] [--round-steps 6]
        [--device auto|cpu|cuda] [--swarm OUTER:METHOD[:dense] ...] [--sim OUTER:METHOD ...]
        [--sweep LR:MU:WARMUP ...] [--reference EARLIER.json] [--json FILE] [--plot FILE]

docs/benchmarks.md has the commands and figures of the measured runs.

The demo's setting: four domains of text shipped with Python (reference manual,
library code, docstrings, licence), one volunteer per domain, so the data is not
identically distributed. Every row starts from the same genesis, trains with the
same optimizer settings (node.demo.local_swarm.DEMO_MODELS) and is measured on the same
held-out blocks of every domain, which no training saw:

- ``genesis``; ``expert D``: domain D's volunteer alone for R x H steps;
- ``joint training``: synchronous data-parallel training on the balanced mixture with
  the same tokens (batch = volunteers x the volunteer batch, R x H steps): the
  reference at equal compute;
- ``swarm ...``: a real local swarm (two aggregators, one volunteer per domain, each a
  process with its own libp2p daemon; one round of H steps per head) for R rounds,
  with the outer optimizer, merge method and delta codec the row names;
- ``merge ...``: the experts merged offline (linear, TIES, DARE-TIES);
- ``sim ...`` (``--sim``, and ``--sweep`` for a grid of outer learning rates, momenta and
  warm-ups): the swarm's arithmetic in one process (the same trainer, delta codec, merge
  engine and outer step, no network), much cheaper than daemons.

The rows run by default depend on the model (DEFAULT_ROWS): every swarm row with daemons on
the tiny model; on SmolLM2, to finish within 45 minutes on a 2-core CPU, the swarm's
defaults with daemons and the other rows as sims. With ``--device cuda`` (or ``auto`` where
CUDA is there) the same comparison runs larger (CUDA_SCALE): longer blocks, bigger
batches, more steps and rounds.

Headline figures: each swarm row's fraction of joint training's mean-loss gain over
the genesis, and each domain's share of its expert's own-domain gain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, when imported

from node.config import TrainOptions  # noqa: E402
from node.demo.domains import DOMAINS  # noqa: E402
from node.demo.local_swarm import (  # noqa: E402
    DEMO_MODELS,
    DemoModel,
    domain_losses,
    eval_sets,
    make_genesis,
    run_swarm_demo,
    save_trained,
    write_domain_data,
)
from protocol.constants import DEFAULT_CODEC  # noqa: E402
from protocol.swarm_config import SwarmConfig  # noqa: E402

Losses = dict[str, float]


@dataclass(frozen=True)
class SwarmRow:
    """A swarm configuration: outer optimizer, merge method, delta codec."""

    outer: str  # none | nesterov
    method: str  # linear | ties | dare_ties | task_arithmetic
    dense: bool = False  # deltas with no DARE drop, float32 values
    lr: float = 0.7
    momentum: float = 0.9
    warmup: int = 0

    @property
    def label(self) -> str:
        outer = self.outer
        if self.outer == "nesterov":
            outer += f" lr={self.lr:g} mu={self.momentum:g}" + (
                f" warmup={self.warmup}" if self.warmup else ""
            )
        return f"{outer}, {self.method}" + (", dense" if self.dense else "")

    def rules(self, drop_rate: float) -> tuple[str, ...]:
        """``mergeswarm init`` flags for this row."""
        flags = ("--outer-optimizer", self.outer, "--outer-lr", str(self.lr))
        flags += ("--outer-momentum", str(self.momentum), "--outer-warmup", str(self.warmup))
        drop, codec = (0.0, "fp32") if self.dense else (drop_rate, DEFAULT_CODEC)
        return flags + ("--drop-rate", str(drop), "--codec", codec)


def parse_row(text: str, base: SwarmRow) -> SwarmRow:
    """``OUTER:METHOD[:dense]``, e.g. ``nesterov:ties`` or ``none:linear:dense``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("none", "nesterov"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OUTER:METHOD[:dense]")
    return SwarmRow(parts[0], parts[1], parts[2:] == ["dense"], base.lr, base.momentum, base.warmup)


# (daemon rows, sim rows) run when --swarm and --sim are not given
DEFAULT_ROWS = {
    "tiny": (["none:linear", "nesterov:linear", "nesterov:ties", "nesterov:linear:dense"], []),
    # one daemon row is ~17 min here, a sim ~7 min (calibrated to within 0.002 mean loss)
    "smollm2-135m": (["nesterov:linear"], ["none:linear", "nesterov:ties"]),
}
# on a GPU: 4x longer blocks, 2x bigger batches, 2x the steps a round, 6 rounds
CUDA_SCALE = {"seq_len": 4, "batch_size": 2, "round_steps": 2, "rounds": 6}


def resolve_device(name: str) -> str:
    """``auto`` is cuda where torch sees a CUDA device, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def scaled(model: DemoModel, device: str) -> tuple[DemoModel, int]:
    """The model's training setting and default rounds on ``device``: as measured on the CPU,
    or CUDA_SCALE larger on a GPU."""
    options = model.train.model_copy(update={"device": device})
    if device != "cuda":
        return replace(model, train=options), 3
    options = options.model_copy(
        update={
            "seq_len": options.seq_len * CUDA_SCALE["seq_len"],
            "batch_size": options.batch_size * CUDA_SCALE["batch_size"],
        }
    )
    steps = model.round_steps * CUDA_SCALE["round_steps"]
    return replace(model, train=options, round_steps=steps), CUDA_SCALE["rounds"]


def mean(loss: Losses) -> float:
    return sum(loss.values()) / len(loss)


def save_weights(trainer, genesis: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)  # joint training saves after every round
    return save_trained(trainer, genesis, out)


def train_rows(genesis, data, options: TrainOptions, rounds, steps, work, evals):
    """Experts (each domain alone) and joint training (the mixture, the volunteers' batches
    together), with joint training measured after every R-th of its steps for the curve."""
    from transformers import AutoTokenizer

    from node.training.data import load_dataset, load_mixture
    from node.training.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(genesis)
    rows: dict[str, Losses] = {}
    curves: dict[str, list[float]] = {}
    for d, path in data.items():
        print(f"expert {d}: {rounds * steps} steps", flush=True)
        dataset = load_dataset([path], tokenizer, seq_len=options.seq_len)
        trainer = Trainer(genesis, dataset, options)
        trainer.train_round(max_steps=rounds * steps, max_seconds=None)
        out = save_weights(trainer, genesis, work / f"expert-{d}")
        rows[f"expert {d}"] = domain_losses(out, evals)
        del trainer
    joint_options = options.model_copy(update={"batch_size": options.batch_size * len(data)})
    print(f"joint: {rounds * steps} steps of {joint_options.batch_size} blocks", flush=True)
    dataset = load_mixture(list(data.values()), tokenizer, seq_len=options.seq_len)
    trainer = Trainer(genesis, dataset, joint_options)
    curves["joint training"] = []
    for _ in range(rounds):
        trainer.train_round(max_steps=steps, max_seconds=None)
        out = save_weights(trainer, genesis, work / "joint")
        rows["joint training"] = domain_losses(out, evals)
        curves["joint training"].append(mean(rows["joint training"]))
    return rows, curves


def offline_merges(genesis, data, work, evals) -> dict[str, Losses]:
    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe

    inputs = [MergeInput(work / f"expert-{d}") for d in data]
    rows = {}
    for label, recipe, density in (
        ("merge linear", Recipe("linear"), 1.0),
        ("merge ties", Recipe("ties"), 0.5),
        ("merge dare_ties", Recipe("dare_ties", seed=1), 0.5),
    ):
        out = work / label.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        merge_models(genesis, inputs, recipe, out, density=density)
        rows[label] = domain_losses(out, evals)
    return rows


def simulate(genesis, data, options, row: SwarmRow, drop_rate, rounds, steps, work, evals):
    """The swarm's rounds in one process (bench_common.swarm_rounds): real deltas, the
    aggregator's merge engine and outer step; the held-out losses after each round."""
    from bench_common import swarm_rounds
    from transformers import AutoTokenizer

    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe
    from aggregator.outer import OuterStep, outer_lr
    from node.training.data import load_dataset
    from protocol.delta import TensorMap, create_delta
    from protocol.identity import Identity

    tokenizer = AutoTokenizer.from_pretrained(genesis)
    datasets = {d: load_dataset([p], tokenizer, seq_len=options.seq_len) for d, p in data.items()}
    identity = Identity.generate()
    drop, codec = (0.0, "fp32") if row.dense else (drop_rate, DEFAULT_CODEC)
    momentum, curve = None, []

    def make_delta(head, weights, out, domain, seed):
        create_delta(head, TensorMap(weights), out, identity=identity, drop_rate=drop,
                     codec=codec, seed=seed)  # fmt: skip

    def merge(r, head, deltas, child):
        nonlocal momentum
        step = None
        if row.outer == "nesterov":
            lr = outer_lr(row.lr, row.warmup, r)
            step = OuterStep(lr, row.momentum, momentum, work / f"momentum-{r}")
        method = Recipe(row.method)
        merge_models(head, [MergeInput(p) for p in deltas], method, child, density=0.5, outer=step)
        momentum = step.out if step else None

    def after_round(r, child):
        curve.append(domain_losses(child, evals))

    swarm_rounds(genesis, datasets, options, rounds, steps, work, make_delta=make_delta,
                 merge=merge, after_round=after_round)  # fmt: skip
    shutil.rmtree(work)
    return curve


def load_reference(path: Path, model: str, settings: dict, genesis: Losses) -> dict:
    """The reference rows of an earlier run, checked to be of this very setting."""
    earlier = json.loads(path.read_text())
    if earlier["model"] != model or earlier["settings"] != settings:
        raise SystemExit(f"{path}: another model or other settings than this run's")
    if earlier["rows"]["genesis"]["loss"] != genesis:
        raise SystemExit(f"{path}: its genesis measured otherwise; not the same genesis")
    keep = ("genesis", "expert ", "joint training", "merge ", "sim ", "swarm ")
    rows = {k: v["loss"] for k, v in earlier["rows"].items() if k.startswith(keep)}
    curves = {k: v for k, v in earlier["curves"].items() if k in rows}
    return {"rows": rows, "curves": curves}


def headline(rows: dict[str, Losses], domains: list[str]) -> dict:
    """Each merged row's fraction of joint training's mean-loss gain over the genesis, and
    each domain's share of its expert's own-domain gain."""
    if "joint training" not in rows:
        return {}
    genesis = rows["genesis"]
    joint_gain = mean(genesis) - mean(rows["joint training"])
    fraction, share = {}, {}
    for label, loss in rows.items():
        if label.startswith(("swarm", "sim", "merge")):
            fraction[label] = round((mean(genesis) - mean(loss)) / joint_gain, 4)
            share[label] = {
                d: round((genesis[d] - loss[d]) / (genesis[d] - rows[f"expert {d}"][d]), 4)
                for d in domains
            }
    return {"fraction_of_joint": fraction, "expert_share": share}


def report(rows: dict[str, Losses], domains: list[str]) -> None:
    print(f"\n| model | {' | '.join(domains)} | mean |")
    print(f"|---|{'---|' * len(domains)}---|")
    for label, loss in rows.items():
        cells = " | ".join(f"{loss[d]:.4f}" for d in domains)
        print(f"| {label} | {cells} | {mean(loss):.4f} |")
    figures = headline(rows, domains)
    if not figures:
        return
    gain = mean(rows["genesis"]) - mean(rows["joint training"])
    print(f"\njoint training gains {gain:.4f} mean loss over the genesis")
    for label, fraction in figures["fraction_of_joint"].items():
        worst = min(figures["expert_share"][label].values())
        print(
            f"{label}: {fraction:.2f} of joint training's gain; "
            f"own-domain share of the experts' gain: worst {worst:.2f}"
        )


def plot(path: Path, curves: dict[str, list[float]], genesis: Losses, tokens_per_round: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curve in curves.items():
        xs = [0] + [tokens_per_round * (r + 1) for r in range(len(curve))]
        ys = [mean(genesis), *curve]
        style = {"linestyle": "--", "linewidth": 1, "alpha": 0.7} if label.startswith("sim") else {}
        if label == "joint training":
            style = {"color": "black", "linewidth": 2.5}
        ax.plot(xs, ys, marker="o", label=label, **style)
    ax.set_xlabel("tokens trained, all volunteers together (markers: rounds)")
    ax.set_ylabel("mean held-out loss, four domains")
    ax.set_title("mergeswarm: the swarm against joint training at equal compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, help="R (default: 3; 6 on CUDA)")
    parser.add_argument("--round-steps", type=int, help="H (default: the model's)")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="tiny: genesis steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--drop-rate", type=float, help="DARE p (default: the model's)")
    swarm_default = {name: f.default for name, f in SwarmConfig.model_fields.items()}
    for flag, kind in (("outer_lr", float), ("outer_momentum", float), ("outer_warmup", int)):
        parser.add_argument(
            "--" + flag.replace("_", "-"), type=kind, default=swarm_default[flag],
            help="nesterov rows (default: the swarm config's)",
        )  # fmt: skip
    parser.add_argument(
        "--swarm",
        nargs="*",
        metavar="OUTER:METHOD[:dense]",
        help="swarm rows run with real daemons (default: the model's, DEFAULT_ROWS)",
    )
    parser.add_argument(
        "--sim",
        nargs="*",
        metavar="OUTER:METHOD[:dense]",
        help="the same rows as in-process sims (default: the model's, DEFAULT_ROWS)",
    )
    parser.add_argument(
        "--sweep",
        nargs="*",
        metavar="LR:MU:WARMUP[:ties][:dense]",
        help="in-process sim rows with nesterov at these outer settings, linear merging (or "
        "ties), DARE deltas (or dense: no drop, float32 values)",
    )
    parser.add_argument("--no-experts", action="store_true", help="skip experts and merges")
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="JSON",
        help="take every row (genesis, experts, joint training, merges, swarm and sim rows) "
        "from this earlier --json of the same model and settings instead of running it again",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--plot", type=Path, help="write the loss curves here (PNG)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, rounds = scaled(DEMO_MODELS[args.model], resolve_device(args.device))
    args.rounds = args.rounds or rounds
    options = model.train
    steps, drop_rate = args.round_steps or model.round_steps, args.drop_rate or model.drop_rate
    base = SwarmRow(
        "nesterov", "linear", False, args.outer_lr, args.outer_momentum, args.outer_warmup
    )
    daemon_rows, sim_rows = DEFAULT_ROWS[model.name]
    if args.swarm is not None or args.sim is not None:
        daemon_rows, sim_rows = args.swarm or [], args.sim or []
    swarm_rows = [parse_row(t, base) for t in daemon_rows]
    sims = [parse_row(t, base) for t in sim_rows]
    for spec in args.sweep or []:
        lr, mu, warmup, *more = spec.split(":")
        method = "ties" if "ties" in more else "linear"
        sims.append(
            SwarmRow("nesterov", method, "dense" in more, float(lr), float(mu), int(warmup))
        )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    domains = list(DOMAINS)
    data = write_domain_data(work, domains)
    genesis = make_genesis(model, work / "genesis", data, args.pretrain_steps, print)
    evals = eval_sets(genesis, data)
    rows: dict[str, Losses] = {"genesis": domain_losses(genesis, evals)}
    print(f"genesis: mean held-out loss {mean(rows['genesis']):.4f}", flush=True)
    curves: dict[str, list[float]] = {}  # mean held-out loss after each round
    tokens = len(domains) * steps * options.batch_size * options.seq_len
    settings = {"rounds": args.rounds, "round_steps": steps, "drop_rate": drop_rate,
                "train": options.model_dump(), "tokens_per_round": tokens}  # fmt: skip
    if args.reference:
        reference = load_reference(args.reference, model.name, settings, rows["genesis"])
        rows |= reference["rows"]
        curves |= reference["curves"]
    elif not args.no_experts:
        trained, curves = train_rows(genesis, data, options, args.rounds, steps, work, evals)
        rows |= trained
    for row in swarm_rows:
        label = f"swarm {row.label}"
        print(
            f"{label}: {args.rounds} rounds, 2 aggregators, {len(domains)} volunteers", flush=True
        )
        shutil.rmtree(work / "swarm", ignore_errors=True)  # left by an interrupted run
        result = run_swarm_demo(
            work / "swarm", model=model, rounds=args.rounds, volunteers=len(domains),
            round_steps=steps, genesis=genesis, merge_method=row.method,
            rules=row.rules(drop_rate), log=lambda line: print("  " + line, flush=True),
        )  # fmt: skip
        shutil.rmtree(work / "swarm", ignore_errors=True)
        rows[label] = result.rounds[args.rounds - 1].loss
        curves[label] = [mean(r.loss) for r in result.rounds[: args.rounds]]
        save(args.json, model.name, settings, rows, curves, time.monotonic() - started)
    for row in sims:
        label = f"sim {row.label}"
        print(f"{label}: {args.rounds} rounds in one process", flush=True)
        curve = simulate(
            genesis, data, options, row, drop_rate, args.rounds, steps, work / "sim", evals
        )
        curves[label] = [mean(loss) for loss in curve]
        rows[label] = curve[-1]
        save(args.json, model.name, settings, rows, curves, time.monotonic() - started)
    if not args.no_experts and not args.reference:
        rows |= offline_merges(genesis, data, work, evals)
    report(rows, domains)
    seconds = time.monotonic() - started
    print(f"\n{seconds:.0f} s in all; models in {work}")
    if args.plot:
        plot(args.plot, curves, rows["genesis"], tokens)
    save(args.json, model.name, settings, rows, curves, seconds)
    return 0


def save(path: Path | None, model: str, settings: dict, rows, curves, seconds: float) -> None:
    """The figures so far as JSON (after every row, so a long run's rows are never lost)."""
    if path is None:
        return
    out = {
        "model": model,
        "settings": settings,
        "rows": {k: {"loss": v, "mean": round(mean(v), 4)} for k, v in rows.items()},
        **headline(rows, list(rows["genesis"])),
        "curves": {k: [round(m, 4) for m in c] for k, c in curves.items()},
        "seconds": round(seconds, 1),
    }
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
