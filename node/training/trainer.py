"""A volunteer's local training: one round on the current base, with a step or time budget.

Full fine-tuning or LoRA (through peft, merged back to dense weights for the
delta); AdamW with linear warm-up and cosine decay over the global step;
gradient accumulation; ``cuda`` with bf16 autocast where supported, else the
CPU in float32. The trainer checkpoints its weights, optimizer moments, step
and data position as safetensors + JSON (never pickle), so a killed node
resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from node.config import TrainOptions
from node.training.data import Dataset, Packed
from protocol.durable import fsync_dir, write_atomic
from protocol.errors import MergeswarmError

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
CHECKPOINT_STATE = "state.json"
LATEST = "latest"


class TrainError(MergeswarmError):
    """Training cannot start: a base that does not load, a device that is not there."""


@dataclass
class RoundStats:
    steps: int
    samples: int  # blocks trained on
    tokens: int
    seconds: float
    loss: float  # mean training loss over the round
    stopped: str  # "budget" | "interrupted"


def pick_device(name: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype: bf16 autocast on CUDA that supports it, none on CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise TrainError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu"), None
    return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else None


class Trainer:
    """Trains a causal LM loaded from ``base_dir``; one instance per base."""

    def __init__(self, base_dir: Path, data: Dataset, options: TrainOptions) -> None:
        from transformers import AutoModelForCausalLM

        self.options = options
        self.data = data
        self.device, self.autocast = pick_device(options.device)
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise TrainError(f"{base_dir}: cannot load the base as a causal LM ({exc})") from None
        if options.lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=options.lora_rank,
                lora_alpha=options.lora_alpha,
                target_modules=options.lora_targets,
                lora_dropout=0.0,
            )
            try:
                model = get_peft_model(model, config)
            except ValueError as exc:
                raise TrainError(f"LoRA: {exc}") from None
        self.model = model.to(self.device)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=options.lr, weight_decay=options.weight_decay
        )
        self.step = 0  # optimizer steps since this node started on any base
        self.position = 0  # blocks consumed since the start (data order resumes from here)
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def lr_at(self, step: int) -> float:
        o = self.options
        warm = min(1.0, (step + 1) / max(o.warmup_steps, 1))
        progress = min(step / max(o.decay_steps, 1), 1.0)
        return o.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _loss(self, blocks: Packed, index: torch.Tensor) -> torch.Tensor:
        ids = blocks.input_ids[index].to(self.device)
        labels = blocks.labels[index].to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        ):
            return self.model(input_ids=ids, labels=labels).loss

    def evaluate(self) -> float:
        """Mean loss over the held-out blocks (at most ``eval_blocks``)."""
        held = self.data.heldout
        n = min(len(held), self.options.eval_blocks)
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, n, self.options.batch_size):
                index = torch.arange(start, min(start + self.options.batch_size, n))
                total += float(self._loss(held, index)) * len(index)
                count += len(index)
        self.model.train()
        return total / max(count, 1)

    def _next_blocks(self, k: int) -> torch.Tensor:
        """The next ``k`` training blocks: a seeded shuffle per epoch, resumable by position."""
        n = len(self.data.train)
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.position, n)
            if self._order[0] != epoch:
                gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
                self._order = (epoch, torch.randperm(n, generator=gen))
            out.append(int(self._order[1][offset]))
            self.position += 1
        return torch.tensor(out)

    def train_round(
        self,
        *,
        max_steps: int | None,
        max_seconds: float | None,
        should_stop: Callable[[], bool] = lambda: False,
        should_finish: Callable[[], bool] = lambda: False,
        on_step: Callable[[int, float], None] | None = None,
    ) -> RoundStats:
        """Train until the step or time budget is spent, or ``should_stop`` says so (the round
        is then "interrupted"), or ``should_finish`` ends it early as if its budget were spent."""
        if not max_steps and not max_seconds:
            raise TrainError("a round needs a budget: --round-steps or --round-minutes")
        o = self.options
        self.model.train()
        started, steps, samples, losses = time.monotonic(), 0, 0, []
        stopped = "budget"
        while True:
            if max_steps and steps >= max_steps:
                break
            if max_seconds and time.monotonic() - started >= max_seconds:
                break
            if should_stop():
                stopped = "interrupted"
                break
            if steps and should_finish():
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            total = 0.0
            for _ in range(o.grad_accum):
                loss = self._loss(self.data.train, self._next_blocks(o.batch_size)) / o.grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(self.params.values(), o.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            steps += 1
            samples += o.batch_size * o.grad_accum
            losses.append(total)
            if on_step is not None:
                on_step(steps, total)
        seconds = time.monotonic() - started
        mean = sum(losses) / len(losses) if losses else float("nan")
        return RoundStats(steps, samples, samples * o.seq_len, seconds, mean, stopped)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The full model's weights after training (LoRA folded in), by base tensor name."""
        if self.options.lora:
            self.model.merge_adapter()  # base weights += scale * B @ A, in place
            try:
                inner = self.model.get_base_model()
                state = {
                    k.replace(".base_layer", ""): v.detach().cpu().clone()
                    for k, v in inner.state_dict().items()
                    if ".lora_" not in k
                }
            finally:
                self.model.unmerge_adapter()  # training goes on with separate adapters
            model = inner
        else:
            model = self.model
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # stored once, as the embedding
        return state

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, directory: Path, extra: dict) -> None:
        """Write a checkpoint under ``directory``: a new ``step-N`` folder, then the ``latest``
        pointer (atomically), then older folders are removed; a crash leaves one valid."""
        directory.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {n: p.detach().cpu().contiguous() for n, p in self.params.items()}
        save_file(weights, tmp / CHECKPOINT_WEIGHTS)
        moments = {}
        for pname, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    moments[f"{key}/{pname}"] = st[key].detach().cpu().contiguous()
        save_file(moments, tmp / CHECKPOINT_OPTIMIZER)
        state = {
            "step": self.step,
            "position": self.position,
            "options": self.options.model_dump(mode="json"),
        }
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state | extra))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        shutil.rmtree(directory / name, ignore_errors=True)
        os.rename(tmp, directory / name)
        fsync_dir(directory)
        write_atomic(directory / LATEST, name.encode())
        for old in directory.iterdir():
            if old.name in (name, LATEST):
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()

    @staticmethod
    def latest(directory: Path) -> Path | None:
        """The newest complete checkpoint under ``directory``, if any."""
        pointer = directory / LATEST
        if not pointer.is_file():
            return None
        found = directory / pointer.read_text().strip()
        return found if (found / CHECKPOINT_STATE).is_file() else None

    def load(self, directory: Path, *, weights: bool = True) -> dict:
        """Restore weights, optimizer moments, step and data position; returns the saved extras.

        ``weights=False`` (the checkpoint was trained on an older base) keeps this trainer's
        weights and takes the rest: fresh AdamW moments would make every round's first steps
        full-size sign steps in every coordinate, a jolt that short rounds never recover from.
        LoRA adapters start afresh on each base, so their moments are not carried over.
        """
        state = json.loads((directory / CHECKPOINT_STATE).read_text())
        if weights:
            saved = load_file(directory / CHECKPOINT_WEIGHTS)
            with torch.no_grad():
                for name, p in self.params.items():
                    if name in saved:
                        p.copy_(saved[name].to(p.device))
        elif self.options.lora:
            self.step, self.position = int(state["step"]), int(state["position"])
            return state
        moments = load_file(directory / CHECKPOINT_OPTIMIZER)
        step_t = torch.tensor(float(state["step"]))
        for name, p in self.params.items():
            if f"exp_avg/{name}" in moments:
                self.optimizer.state[p] = {
                    "step": step_t.clone(),
                    "exp_avg": moments[f"exp_avg/{name}"].to(p.device),
                    "exp_avg_sq": moments[f"exp_avg_sq/{name}"].to(p.device),
                }
        self.step, self.position = int(state["step"]), int(state["position"])
        return state


def heldout_loss(base_dir: Path, data: Dataset, *, blocks: int = 64, batch_size: int = 8) -> float:
    """Mean loss of the model in ``base_dir`` on ``data``'s held-out blocks (CPU or GPU)."""
    options = TrainOptions(eval_blocks=blocks, batch_size=batch_size)
    return Trainer(base_dir, data, options).evaluate()
