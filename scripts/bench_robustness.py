"""Can strangers poison a round? Honest volunteers plus attackers of each kind, through the
aggregator's real admission, screening and merge, against the same round without them.

    .venv/bin/python scripts/bench_robustness.py [--model tiny|smollm2-135m] [--honest 4]
        [--round-steps N] [--json FILE]

docs/benchmarks.md has the command and figures of the measured runs.

One round from one genesis: each honest volunteer trains ``--round-steps`` steps on the
demo's text (node.demo: four domains, mixed; each volunteer in its own order, or one domain
each with ``--non-iid``) and makes a real signed ``.msd`` with its own key. An attacker
trains the same way and then turns its delta into an attack:

- ``scaled``: its delta times 100;
- ``spike``: its whole norm budget (five honest deltas' median norm) on one weight of the
  final norm layer, at a position its chosen DARE seed keeps;
- ``sign_flip``: its delta negated;
- ``noise``: Gaussian noise with its delta's per-tensor norms;
- ``sybil_crowd``: sixteen fresh keys, each announcing its delta negated under another mask;
- ``median_drag``: eight fresh keys with near-empty deltas (its delta times 1e-3), to drag
  the round's median norm down so that honest deltas look too large.

The first four come one attacker to four honest volunteers (one in five). Each round runs
as the aggregator runs it (aggregator.screening and aggregator.daemon): candidates ranked by
the head's beacon, inspected, scored on the aggregator's evaluation data where it has some,
weighed, merged with the swarm config's recipe and outer step. Three times: with
evaluation data (the setting ``mergeswarm init`` recommends for an open swarm); without
(``_no_eval``), where every author is new and only the norm screen, the per-entry bound and
the merge stand in the way; and without, in a swarm where the honest volunteers had deltas
merged before and the attackers' keys are new (``_no_eval_established``: the newcomers'
share of a round is capped, aggregator.reputation).

The figure per attack: the merged head's held-out loss (mean over the four domains'
held-out blocks, which neither training nor the aggregator's evaluation saw) against the
clean round's, and how many honest deltas were merged. Target: within 1%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from node.demo.domains import DOMAINS, domain_texts  # noqa: E402
from node.demo.local_swarm import (  # noqa: E402
    DEMO_MODELS,
    domain_losses,
    eval_sets,
    make_genesis,
    write_domain_data,
)

SCALE = 100.0
EMPTY = 1e-3
SYBILS = 16
DRAGGERS = 8


@dataclass
class Delta:
    path: Path
    author: str
    honest: bool


def train_delta(
    genesis: Path, data: list[Path], options, steps: int, seed: int
) -> dict[str, torch.Tensor]:
    """``trained - genesis`` after ``steps`` steps on ``data`` (in the order ``seed`` draws),
    per base tensor name."""
    from transformers import AutoTokenizer

    from node.training.data import load_mixture
    from node.training.trainer import Trainer
    from protocol.model_dir import ModelDir

    dataset = load_mixture(data, AutoTokenizer.from_pretrained(genesis), seq_len=options.seq_len)
    trainer = Trainer(genesis, dataset, options.model_copy(update={"seed": seed}))
    trainer.train_round(max_steps=steps, max_seconds=None)
    weights = trainer.trained_weights()
    with ModelDir(genesis) as md:
        return {n: weights[n].float() - md.tensor(n).float() for n in md.names()}


def write_delta(genesis: Path, diff: dict, out: Path, *, drop_rate: float, codec: str, seed: int):
    """A signed ``.msd`` of ``genesis + diff`` under a fresh key: (path, author)."""
    from protocol.delta import TensorMap, create_delta
    from protocol.identity import Identity
    from protocol.model_dir import ModelDir

    identity = Identity.generate()
    with ModelDir(genesis) as md:
        tuned = {n: (md.tensor(n).float() + diff[n]).to(md.tensor(n).dtype) for n in md.names()}
    create_delta(
        genesis,
        TensorMap(tuned),
        out,
        identity=identity,
        drop_rate=drop_rate,
        codec=codec,
        seed=seed,
    )
    return out, identity.author


def spike(genesis: Path, budget: float, drop_rate: float, seed: int) -> dict[str, torch.Tensor]:
    """All of ``budget`` on one weight of the final norm layer that DARE's mask keeps."""
    from protocol import dare
    from protocol.model_dir import ModelDir

    name = "model.norm.weight"
    with ModelDir(genesis) as md:
        diff = {n: torch.zeros_like(md.tensor(n), dtype=torch.float32) for n in md.names()}
    flat = diff[name].view(-1)
    _, keep = next(dare.iter_keep_masks(seed, name, flat.numel(), drop_rate))
    at = int(keep.nonzero()[0][0])
    flat[at] = -budget * (1.0 - drop_rate)  # the rescale of survivors brings it to -budget
    return diff


def norm_of(path: Path) -> float:
    from protocol.container import DeltaReader

    with DeltaReader(path) as reader:
        return (
            sum(float(reader.read_tensor(n).double().square().sum()) for n in reader.names()) ** 0.5
        )


ATTACKS = ("scaled", "spike", "sign_flip", "noise", "sybil_crowd", "median_drag")


def make_attacks(
    names, genesis, attacker_diff, honest_norm, work, drop_rate, codec
) -> dict[str, list[Delta]]:
    """The attackers' deltas of each attack in ``names``, each under its own fresh key."""

    def one(name: str, diff: dict, seed: int) -> Delta:
        path, author = write_delta(
            genesis, diff, work / f"{name}-{seed}.msd", drop_rate=drop_rate, codec=codec, seed=seed
        )
        return Delta(path, author, honest=False)

    def noise() -> dict:
        g = torch.Generator().manual_seed(7)
        out = {}
        for n, d in attacker_diff.items():
            r = torch.randn(d.shape, generator=g)
            out[n] = r * (d.norm() / r.norm().clamp(min=1e-30))
        return out

    def scaled(factor: float) -> dict:
        return {n: d * factor for n, d in attacker_diff.items()}

    build = {
        "scaled": lambda: [one("scaled", scaled(SCALE), 11)],
        "spike": lambda: [one("spike", spike(genesis, 5 * honest_norm, drop_rate, 12), 12)],
        "sign_flip": lambda: [one("flip", scaled(-1.0), 13)],
        "noise": lambda: [one("noise", noise(), 14)],
        "sybil_crowd": lambda: [one("sybil", scaled(-1.0), 100 + i) for i in range(SYBILS)],
        "median_drag": lambda: [one("drag", scaled(EMPTY), 200 + i) for i in range(DRAGGERS)],
    }
    return {name: build[name]() for name in names}


@dataclass
class Decision:
    weights: list[tuple[Path, float]]  # merged deltas and their weights
    refused: dict[str, int]  # reason -> count


def decide_round(
    genesis: Path, deltas: list[Delta], config, gate, established: bool = False
) -> Decision:
    """The aggregator's admission and weighing (aggregator.daemon's ``_admit`` and
    ``run_round``, without the network): rank, inspect, score, fill the slots, weigh."""
    from aggregator.screening import (
        Admitted,
        Candidate,
        Rejected,
        admit_scored,
        fill_slots,
        inspect_delta,
        rank_candidates,
        weigh_admitted,
    )
    from protocol.container import DeltaReader
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir
    from protocol.records import DeltaAnnouncement

    refused: dict[str, int] = {}
    paths: dict[str, Path] = {}
    honest_paths = {d.path for d in deltas if d.honest}
    beacon = base_id(ModelDir(genesis))
    candidates = []
    for d in deltas:
        with DeltaReader(d.path) as reader:
            delta_id = reader.id
        paths[delta_id] = d.path
        body = DeltaAnnouncement(
            base_id=beacon, delta_id=delta_id, size=d.path.stat().st_size, round=0
        )
        candidates.append(Candidate(d.author, body, 0))

    def refuse(reason: str) -> None:
        refused[reason] = refused.get(reason, 0) + 1

    with ModelDir(genesis) as parent:

        def check(batch: list[Candidate]) -> list[Admitted | None]:
            norms = {}
            for c in batch:
                try:
                    _, norms[c.delta_id] = inspect_delta(
                        paths[c.delta_id],
                        c,
                        parent,
                        max_bytes=config.max_delta_bytes,
                        drop_rate=config.drop_rate,
                    )
                except Rejected as exc:
                    refuse(exc.reason)
            passed = [(c, norms[c.delta_id]) for c in batch if c.delta_id in norms]
            gains = {}
            if gate is not None and passed:
                scored = gate.contributions(genesis, [paths[c.delta_id] for c, _ in passed])
                gains = {c.delta_id: g for (c, _), g in zip(passed, scored.gains, strict=True)}
            out = admit_scored(passed, gains, lambda c, gain: refuse("no_gain"))
            return [out.get(c.delta_id) for c in batch]

        known = {d.author for d in deltas if established and d.honest}
        ranked = rank_candidates(candidates, beacon, known)
        admitted = fill_slots(ranked, check, config.max_deltas, 16, lambda c: refuse("copy"))
    refused["no slot"] = len(candidates) - len(admitted) - sum(refused.values())
    verdicts = weigh_admitted(
        admitted,
        config,
        scored=gate is not None,
        newcomers={d for d in paths if not (established and paths[d] in honest_paths)},
    )
    weights = []
    for delta_id, v in verdicts.items():
        if v.weight is None:
            refuse(v.reason or "norm")
        else:
            weights.append((paths[delta_id], v.weight))
    refused = {k: n for k, n in refused.items() if n}
    return Decision(weights, refused)


def merge_round(genesis: Path, decision: Decision, config, out: Path) -> Path:
    """The merge as the aggregator makes it: the swarm's recipe and (first round) outer step."""
    from aggregator.engine import MergeInput, merge_models
    from aggregator.methods import Recipe
    from aggregator.outer import OuterStep, outer_lr

    outer = None
    if config.outer_optimizer == "nesterov":
        lr = outer_lr(config.outer_lr, config.outer_warmup, 1)
        outer = OuterStep(lr, config.outer_momentum, None, out.with_name(out.name + ".momentum"))
    inputs = [MergeInput(p, weight=w) for p, w in decision.weights]
    merge_models(
        genesis, inputs, Recipe.for_swarm(config), out, density=config.density, outer=outer
    )
    return out


def run_round(genesis: Path, deltas: list[Delta], config, gate, out: Path, established=False):
    """The aggregator's round over ``deltas``: (merged head, honest deltas merged, decision).
    ``established``: the honest volunteers had deltas merged before (aggregator.reputation);
    otherwise every author is new, as in a swarm's first round."""
    decision = decide_round(genesis, deltas, config, gate, established)
    shutil.rmtree(out, ignore_errors=True)
    merge_round(genesis, decision, config, out)
    merged = {p.name for p, _ in decision.weights}
    return out, sum(1 for d in deltas if d.honest and d.path.name in merged), decision


def largest_entry_ratio(paths: list[Path]) -> float:
    """The largest |entry| of the honest deltas in units of its tensor's robust scale (what
    the swarm config's ``entry_clip`` bounds): how far below the bound honest work stays."""
    from aggregator.methods import robust_scale
    from protocol.container import DeltaReader

    readers = [DeltaReader(p) for p in paths]
    worst = 0.0
    try:
        for name in readers[0].names():
            tvs = [r.read_tensor(name).float() for r in readers]
            scale = robust_scale(tvs)
            if scale > 0:
                worst = max(worst, max(float(t.abs().max()) for t in tvs) / scale)
    finally:
        for r in readers:
            r.close()
    return worst


def mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def write_eval_data(work: Path, every: int = 3) -> Path:
    """The aggregator's evaluation text: a share of every domain's training text (never the
    held-out examples the figures are measured on: every 10th, as node.training.data
    splits them)."""
    path = work / "eval.jsonl"
    lines = []
    for name in DOMAINS:
        texts = domain_texts(name)
        lines += [t for i, t in enumerate(texts) if (i + 1) % 10 and i % every == 0]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="tiny")
    parser.add_argument("--honest", type=int, default=4, help="honest volunteers")
    parser.add_argument(
        "--non-iid",
        action="store_true",
        help="each honest volunteer trains on one domain (default: all on the mixture, "
        "each in its own order)",
    )
    parser.add_argument(
        "--round-steps", type=int, help="training steps per delta (default: the demo's)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=400, help="tiny: genesis steps")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, help="only these attacks")
    parser.add_argument(
        "--work", type=Path, help="keep the work here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from aggregator.gate import EvalGate
    from protocol.swarm_config import SwarmConfig

    started = time.perf_counter()
    model = DEMO_MODELS[args.model]
    steps = args.round_steps or model.round_steps
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
    domains = list(DOMAINS)[: max(1, min(args.honest, len(DOMAINS)))]
    data = write_domain_data(work, list(DOMAINS))
    genesis = make_genesis(model, work / "genesis", data, args.pretrain_steps, print)
    evals = eval_sets(genesis, data)
    config = SwarmConfig(
        swarm_id="bench", genesis_id="0" * 64, drop_rate=model.drop_rate, max_deltas=16
    )
    gate = EvalGate([str(write_eval_data(work))], blocks=32)
    drop, codec = config.drop_rate, config.codec

    print(f"{args.honest} honest volunteers and an attacker: {steps} steps each", flush=True)
    honest: list[Delta] = []
    for i in range(args.honest):
        own = [data[domains[i % len(domains)]]] if args.non_iid else list(data.values())
        diff = train_delta(genesis, own, model.train, steps, seed=i)
        path, author = write_delta(
            genesis, diff, work / f"honest-{i}.msd", drop_rate=drop, codec=codec, seed=1 + i
        )
        honest.append(Delta(path, author, honest=True))
    attacker_diff = train_delta(genesis, list(data.values()), model.train, steps, seed=99)
    honest_norm = sorted(norm_of(d.path) for d in honest)[len(honest) // 2]
    names = args.attacks or ATTACKS
    attacks = make_attacks(names, genesis, attacker_diff, honest_norm, work, drop, codec)

    genesis_loss = mean(domain_losses(genesis, evals))
    ratio = largest_entry_ratio([d.path for d in honest])
    print(f"honest deltas' largest entry: {ratio:.2f} x its tensor's robust scale "
          f"(entry_clip {config.entry_clip:g})")  # fmt: skip
    results: dict = {"model": args.model, "genesis_loss": round(genesis_loss, 4)}
    results["honest_largest_entry_ratio"] = round(ratio, 3)
    settings = (
        ("", gate, False, "with evaluation data"),
        ("_no_eval", None, False, "without evaluation data, every author new"),
        ("_no_eval_established", None, True, "without evaluation data, the honest established"),
    )
    for suffix, judge, established, title in settings:
        head, merged, _ = run_round(genesis, honest, config, judge, work / "clean", established)
        clean = mean(domain_losses(head, evals))
        rows = {}
        print(f"\n{title}: clean round {clean:.4f} "
              f"({merged}/{len(honest)} honest merged; genesis {genesis_loss:.4f})")  # fmt: skip
        print(f"{'attack':<14}{'loss':>9}{'vs clean':>10}{'honest':>9}  refused")
        for name, bad in attacks.items():
            head, merged, decision = run_round(
                genesis, honest + bad, config, judge, work / name, established
            )
            loss = mean(domain_losses(head, evals))
            rows[name] = {
                "loss": round(loss, 4),
                "honest_merged": merged,
                "honest_total": len(honest),
                "vs_clean": round(loss / clean - 1, 4),
            }
            refused = ", ".join(f"{k} {v}" for k, v in sorted(decision.refused.items())) or "-"
            print(
                f"{name:<14}{loss:>9.4f}{loss / clean - 1:>+10.2%}{merged:>6}/{len(honest)}  {refused}"
            )
        results["clean_loss" + suffix] = round(clean, 4)
        results["attacks" + suffix] = rows
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
