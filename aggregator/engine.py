"""The streaming merge engine: base + lambda * merge(task vectors), one tensor at a time.

Peak memory is about (K + 3) tensors of the largest size (K sparsified task
vectors, the base in float32, the output) plus bounded per-chunk
temporaries, whatever the model size. Inputs are sorted by content (see
aggregator.inputs) and every reduction runs in that order in float32, so the same inputs in any
order, with any thread count, give the same bytes and the same base id.
Given an outer step (aggregator.outer), the merged delta moves the base through
it instead, with the previous momentum read and the next written tensor by
tensor (two more float32 tensors at a time).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aggregator.inputs import TaskVectorSource, open_source
from aggregator.methods import Recipe, TensorStats, merge_tensor
from aggregator.outer import OuterStep
from protocol.errors import BaseMismatchError, EncodeError
from protocol.ids import BaseHasher, base_id
from protocol.model_dir import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, ModelDir, write_model_dir
from protocol.momentum import MomentumReader, MomentumWriter
from protocol.numerics import all_finite

logger = logging.getLogger(__name__)

REPORT_FILE = "mergeswarm_merge.json"


@dataclass(frozen=True)
class MergeInput:
    """One input and its per-input parameters.

    :param path: a model directory, a LoRA adapter directory or a ``.msd`` file.
    :param weight: multiplies the task vector (see aggregator.methods).
    :param density: keep fraction for trimming or DARE; None takes the recipe-wide one.
    :param trained_on: for a stale ``.msd`` delta, the ancestor base it was made against
        (same tensor layout); it is merged onto the base as it is.
    """

    path: Path
    weight: float = 1.0
    density: float | None = None
    trained_on: str | None = None


@dataclass
class MergeReport:
    base: str
    base_id: str
    recipe: dict
    inputs: list[dict]
    child_id: str = ""
    seconds: float = 0.0
    tensors: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


@dataclass
class _Plan:
    base: ModelDir
    base_hex: str | None  # None until hashed along the merge (no input needed it earlier)
    sources: list[TaskVectorSource]  # in the engine's order
    inputs: list[MergeInput]  # in the same order


@dataclass
class _Outer:
    """An outer step under way: the parent's momentum read, this round's written."""

    step: OuterStep
    previous: MomentumReader | None
    writer: MomentumWriter

    @classmethod
    def open(cls, step: OuterStep, base: ModelDir) -> _Outer:
        previous = MomentumReader(step.previous, base) if step.previous else None
        return cls(step, previous, MomentumWriter(step.out, base))

    def apply(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        """The update for one tensor; its new momentum goes to the writer."""
        previous = self.previous.tensor(name) if self.previous else None
        update, momentum = self.step.apply(merged, previous)
        self.writer.add(name, momentum)
        return update

    def close(self, ok: bool) -> None:
        if self.previous is not None:
            self.previous.close()
        if ok:
            self.writer.close()
        else:
            self.writer.abort()


def _plan(base: str | os.PathLike[str], inputs: Sequence[MergeInput], dry_run: bool) -> _Plan:
    if not inputs:
        raise ValueError("a merge needs at least one input")
    base_md = ModelDir(base)
    sources: list[TaskVectorSource] = []
    try:
        for item in inputs:
            sources.append(open_source(item.path))
        base_hex = None
        if dry_run or any(src.needs_base_id for src in sources):
            base_hex = base_id(base_md)
        for src, item in zip(sources, inputs, strict=True):
            src.check(base_md, item.trained_on or base_hex)
        order = _canonical_order(sources, inputs)
    except BaseException:
        for src in sources:
            src.close()
        raise
    return _Plan(base_md, base_hex, [sources[i] for i in order], [inputs[i] for i in order])


def _canonical_order(sources: list[TaskVectorSource], inputs: Sequence[MergeInput]) -> list[int]:
    """Input positions sorted by content (then parameters); the same input twice is refused.

    Full ids are computed only where order keys are equal, which for model
    directories (keyed by a fingerprint) is rare and for everything else means
    the same content.
    """
    keys = [src.order_key for src in sources]
    tied = {k for k in keys if keys.count(k) > 1}
    seen: dict[str, Path] = {}
    for src, item, key in zip(sources, inputs, keys, strict=True):
        if key in tied:
            if src.id in seen:
                raise BaseMismatchError(f"{item.path}: the same input as {seen[src.id]}")
            seen[src.id] = item.path
    return sorted(
        range(len(inputs)),
        key=lambda i: (
            keys[i],
            sources[i].id if keys[i] in tied else "",
            inputs[i].weight,
            inputs[i].density or 0.0,
        ),
    )


def merge_models(
    base: str | os.PathLike[str],
    inputs: Sequence[MergeInput],
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    density: float = 1.0,
    dtype: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    outer: OuterStep | None = None,
) -> MergeReport:
    """Merge ``inputs`` into ``base`` and write the result to ``out`` (unless ``dry_run``).

    :param density: the default per-input density (trim keep fraction or DARE keep rate).
    :param dtype: output dtype of floating-point tensors (safetensors name); default the base's.
    :param progress: called with base bytes as each tensor is done.
    :param outer: apply the merged delta with this outer step (aggregator.outer) instead of
        adding it; its momentum file is written once the child is.
    """
    started = time.perf_counter()
    plan = _plan(base, inputs, dry_run)
    report = MergeReport(
        base=str(base),
        base_id=plan.base_hex or "",
        recipe=asdict(recipe),
        inputs=[
            {
                "path": str(i.path),
                "kind": s.kind,
                ("fingerprint" if s.kind == "model" else "id"): s.order_key,
                "weight": i.weight,
                "density": i.density or density,
            }
            for i, s in zip(plan.inputs, plan.sources, strict=True)
        ],
    )
    if outer is not None:
        report.recipe["outer"] = {"lr": outer.lr, "momentum": outer.momentum}
    state: _Outer | None = None
    ok = False
    try:
        if dry_run:
            return report
        hasher = BaseHasher()
        base_hasher = BaseHasher() if plan.base_hex is None else None
        state = _Outer.open(outer, plan.base) if outer is not None else None
        stream = _merged_tensors(
            plan, recipe, density, dtype, (hasher, base_hasher), report, progress, state
        )
        write_model_dir(
            out,
            plan.base,
            stream,
            float_dtype=dtype,
            extra_files=lambda: (
                _finish(report, hasher, base_hasher, started) | _config_with_dtype(plan.base, dtype)
            ),
        )
        ok = True
        return report
    finally:
        if state is not None:
            state.close(ok)
        for src in plan.sources:
            src.close()


def _finish(
    report: MergeReport, hasher: BaseHasher, base_hasher: BaseHasher | None, started: float
) -> dict[str, bytes]:
    report.child_id = hasher.hexdigest()
    if base_hasher is not None:
        report.base_id = base_hasher.hexdigest()
    report.seconds = time.perf_counter() - started
    return {REPORT_FILE: report.to_json()}


def _config_with_dtype(base: ModelDir, dtype: str | None) -> dict[str, bytes]:
    """The base's config.json naming the new dtype, when the output dtype changes."""
    config_path = base.path / "config.json"
    if dtype is None or not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    torch_name = str(DTYPES[dtype]).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = torch_name
    return {"config.json": json.dumps(config, indent=2).encode()}


def _merged_tensors(
    plan: _Plan,
    recipe: Recipe,
    density: float,
    dtype: str | None,
    hashers: tuple[BaseHasher, BaseHasher | None],
    report: MergeReport,
    progress: Callable[[int], None] | None,
    outer: _Outer | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    weights = [i.weight for i in plan.inputs]
    densities = [i.density if i.density is not None else density for i in plan.inputs]
    presparsified = [s.presparsified for s in plan.sources]
    child_hasher, base_hasher = hashers
    for name in plan.base.names():
        info = plan.base.tensors[name]
        tensor = plan.base.tensor(name)
        if base_hasher is not None:  # before the merge adds to it in place
            base_hasher.update(name, info.dtype, tensor)
        if info.dtype not in FLOAT_DTYPES:
            for src in plan.sources:
                src.check_unchanged(name, tensor)
        else:
            if not all_finite(tensor):
                raise BaseMismatchError(
                    f"{plan.base.path}: base tensor {name!r} contains NaN or Inf"
                )
            tensor = _merge_one(
                name, tensor, plan, weights, densities, presparsified, recipe, report, outer
            )
            tensor = tensor.to(DTYPES[dtype or info.dtype])
            if not all_finite(tensor):
                raise EncodeError(
                    f"tensor {name!r}: the merged values overflow {dtype or info.dtype}"
                )
        child_hasher.update(name, DTYPE_NAMES[tensor.dtype], tensor)
        if progress is not None:
            progress(info.nbytes)
        yield name, tensor
        del tensor  # not alive while the next one is read and merged


def _merge_one(
    name: str,
    tensor: torch.Tensor,
    plan: _Plan,
    weights: list[float],
    densities: list[float],
    presparsified: list[bool],
    recipe: Recipe,
    report: MergeReport,
    outer: _Outer | None,
) -> torch.Tensor:
    touched = any(src.touches(name) for src in plan.sources)  # not: LoRA on other modules
    if not touched and outer is None:
        report.tensors[name] = _stats_row(TensorStats(0.0, 0.0))
        return tensor
    base32 = tensor.to(torch.float32)  # task vectors and their merge are float32

    def task_vectors() -> Iterator[torch.Tensor]:
        for src in plan.sources:
            tv = src.task_vector(name, base32)
            yield torch.zeros_like(base32) if tv is None else tv

    if touched:
        merged, stats = merge_tensor(
            name, task_vectors(), weights, densities, recipe, presparsified=presparsified
        )
    else:  # the momentum still moves it
        merged, stats = torch.zeros_like(base32), TensorStats(0.0, 0.0)
    report.tensors[name] = _stats_row(stats)
    if outer is not None:
        merged = outer.apply(name, merged)
    if tensor.dtype == torch.float64:  # keep the base's precision where it has more
        return tensor.add_(merged)
    return base32.add_(merged)


def _stats_row(stats: TensorStats) -> dict:
    return {
        "kept_fraction": round(stats.kept_fraction, 6),
        "conflict_rate": round(stats.conflict_rate, 6),
    }
