"""Does merge-training work? Held-out loss per domain: genesis, experts, joint training,
offline merges of the experts, and the swarm's own head, all from one genesis in one run.

    .venv/bin/python scripts/bench_quality.py [--rounds 3] [--round-steps 30] [--workdir DIR]

The demo's setting with four domains of text shipped with Python (reference
manual, library code, docstrings, licence) and a genesis pretrained on a
balanced mixture of them. First a real local swarm (two aggregators, one
volunteer per domain, one round of --round-steps per head) runs R rounds.
Then, from the same genesis: each domain's expert trains alone for the
R x round-steps its volunteer put into the head; one model trains jointly on
the balanced mixture for the sum of those steps; and the experts are merged
offline with linear averaging, task arithmetic, TIES and DARE-TIES. Every
model is measured on the same held-out blocks of each domain, which no
training saw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.engine import MergeInput, merge_models  # noqa: E402
from aggregator.methods import Recipe  # noqa: E402
from node.config import TrainOptions  # noqa: E402
from node.domains import DOMAINS  # noqa: E402
from node.swarm_demo import (  # noqa: E402
    SEQ_LEN,
    VOLUNTEER_LR,
    domain_losses,
    eval_sets,
    pretrain_genesis,
    run_swarm_demo,
    write_domain_data,
)
from protocol.model_dir import ModelDir, write_model_dir  # noqa: E402

# The swarm volunteers' optimiser settings (node/swarm_demo.py), so experts and joint
# training differ from the swarm only in how they combine, never in how they train.
LR, BATCH, WARMUP = VOLUNTEER_LR, 8, 5


def train(genesis: Path, data: list[Path], steps: int, out: Path) -> Path:
    from transformers import AutoTokenizer

    from node.data import load_mixture
    from node.trainer import Trainer

    dataset = load_mixture(data, AutoTokenizer.from_pretrained(genesis), seq_len=SEQ_LEN)
    options = TrainOptions(seq_len=SEQ_LEN, batch_size=BATCH, lr=LR, warmup_steps=WARMUP)
    trainer = Trainer(genesis, dataset, options)
    trainer.train_round(max_steps=steps, max_seconds=None)
    weights = trainer.trained_weights()
    with ModelDir(genesis) as md:
        write_model_dir(out, md, ((n, weights[n].to(md.tensor(n).dtype)) for n in md.names()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--merge-method", default="linear", help="the swarm's merge method")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="the swarm's lambda")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    domains = list(DOMAINS)
    data = write_domain_data(work, domains)
    started = time.monotonic()
    print(f"genesis: pretraining {args.pretrain_steps} steps on all {len(domains)} domains")
    genesis = pretrain_genesis(work / "genesis", data, args.pretrain_steps, print)
    evals = eval_sets(genesis, data)
    rows: dict[str, dict[str, float]] = {"genesis": domain_losses(genesis, evals)}

    print(f"swarm: {args.rounds} rounds, 2 aggregators, {len(domains)} volunteers")
    swarm = run_swarm_demo(
        work / "swarm",
        rounds=args.rounds,
        volunteers=len(domains),
        round_steps=args.round_steps,
        drop_rate=args.drop_rate,
        genesis=genesis,
        merge_method=args.merge_method,
        lam=args.lam,
        log=lambda line: print("  " + line),
    )
    rows[f"swarm head (round {swarm.rounds[-1].round})"] = swarm.rounds[-1].loss
    # Each volunteer trains one round of --round-steps per head, so the head of round R holds
    # R rounds of each (the checkpoints may hold one more, begun on the last head).
    steps = {d: args.rounds * args.round_steps for d in domains}
    print(f"volunteer steps in the swarm's head: {steps}")

    experts = {}
    for d in domains:
        print(f"expert {d}: {steps[d]} steps")
        experts[d] = train(genesis, [data[d]], steps[d], work / f"expert-{d}")
        rows[f"expert {d}"] = domain_losses(experts[d], evals)
    total = sum(steps.values())
    print(f"joint: {total} steps on all domains")
    rows["joint training"] = domain_losses(
        train(genesis, list(data.values()), total, work / "joint"), evals
    )
    inputs = [MergeInput(experts[d]) for d in domains]
    for label, recipe, density in (
        ("merge linear", Recipe("linear"), 1.0),
        ("merge task arithmetic", Recipe("task_arithmetic", lam=1.0), 1.0),
        ("merge ties", Recipe("ties", lam=1.0), 0.5),
        ("merge dare_ties", Recipe("dare_ties", lam=1.0, seed=1), 0.5),
    ):
        out = work / label.replace(" ", "-")
        merge_models(genesis, inputs, recipe, out, density=density)
        rows[label] = domain_losses(out, evals)
    report(rows, domains, swarm.rounds[-1].round)
    print(f"\n{time.monotonic() - started:.0f} s in all; models in {work}")
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "loss": rows}, indent=2) + "\n")
    return 0


def report(rows: dict[str, dict[str, float]], domains: list[str], rounds: int) -> None:
    print()
    print(f"| model | {' | '.join(domains)} | mean loss | mean ppl |")
    print(f"|---|{'---|' * len(domains)}---|---|")
    for label, loss in rows.items():
        mean = sum(loss[d] for d in domains) / len(domains)
        cells = " | ".join(f"{loss[d]:.3f}" for d in domains)
        print(f"| {label} | {cells} | {mean:.3f} | {math.exp(mean):.1f} |")
    head = next(v for k, v in rows.items() if k.startswith("swarm head"))
    genesis, linear, joint = rows["genesis"], rows["merge linear"], rows["joint training"]

    def mean(loss: dict[str, float]) -> float:
        return sum(loss[d] for d in domains) / len(domains)

    expert_own = {d: rows[f"expert {d}"][d] for d in domains}
    print()
    beats_genesis = [d for d in domains if head[d] < genesis[d]]
    print(
        f"swarm head beats genesis on {len(beats_genesis)}/{len(domains)} domains "
        f"(target: all): {'met' if len(beats_genesis) == len(domains) else 'NOT met'}"
    )
    print(
        f"swarm head mean loss {mean(head):.3f} vs linear averaging {mean(linear):.3f} "
        f"(target: lower): {'met' if mean(head) < mean(linear) else 'NOT met'}"
    )
    gained = mean(genesis) - mean(head)
    print(
        f"of the experts' own-domain gain over genesis ({mean(genesis) - mean(expert_own):.3f}), "
        f"the head keeps {gained:.3f}; joint training gains {mean(genesis) - mean(joint):.3f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
