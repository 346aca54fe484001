"""The streaming merge engine: base + lambda * merge(task vectors), one tensor at a time.

Peak memory is about (K + 3) tensors of the largest size (K sparsified task
vectors, the base in float32, the output) plus bounded per-chunk
temporaries, whatever the model size. Inputs are sorted by content id and
every reduction runs in that order in float32, so the same inputs in any
order, with any thread count, give the same bytes and the same base id.
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
from protocol.errors import BaseMismatchError, EncodeError
from protocol.ids import BaseHasher, base_id
from protocol.model_dir import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, ModelDir, write_model_dir
from protocol.numerics import all_finite

logger = logging.getLogger(__name__)

REPORT_FILE = "mergeswarm_merge.json"


@dataclass(frozen=True)
class MergeInput:
    """One input and its per-input parameters.

    :param path: a model directory, a LoRA adapter directory or a ``.msd`` file.
    :param weight: multiplies the task vector (see aggregator.methods).
    :param density: keep fraction for trimming or DARE; None takes the recipe-wide one.
    """

    path: Path
    weight: float = 1.0
    density: float | None = None


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
    base_hex: str
    sources: list[TaskVectorSource]  # sorted by id
    inputs: list[MergeInput]  # in the same order


def _plan(base: str | os.PathLike[str], inputs: Sequence[MergeInput]) -> _Plan:
    if not inputs:
        raise ValueError("a merge needs at least one input")
    base_md = ModelDir(base)
    base_hex = base_id(base_md)
    sources: list[TaskVectorSource] = []
    try:
        seen: dict[str, Path] = {}
        for item in inputs:
            sources.append(open_source(item.path))
            sources[-1].check(base_md, base_hex)
            if sources[-1].id in seen:
                raise BaseMismatchError(f"{item.path}: the same input as {seen[sources[-1].id]}")
            seen[sources[-1].id] = item.path
    except BaseException:
        for src in sources:
            src.close()
        raise
    order = sorted(
        range(len(inputs)),
        key=lambda i: (sources[i].id, inputs[i].weight, inputs[i].density or 0.0),
    )
    return _Plan(base_md, base_hex, [sources[i] for i in order], [inputs[i] for i in order])


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
) -> MergeReport:
    """Merge ``inputs`` into ``base`` and write the result to ``out`` (unless ``dry_run``).

    :param density: the default per-input density (trim keep fraction or DARE keep rate).
    :param dtype: output dtype of floating-point tensors (safetensors name); default the base's.
    :param progress: called with base bytes as each tensor is done.
    """
    started = time.perf_counter()
    plan = _plan(base, inputs)
    report = MergeReport(
        base=str(base),
        base_id=plan.base_hex,
        recipe=asdict(recipe),
        inputs=[
            {
                "path": str(i.path),
                "kind": s.kind,
                "id": s.id,
                "weight": i.weight,
                "density": i.density or density,
            }
            for i, s in zip(plan.inputs, plan.sources, strict=True)
        ],
    )
    try:
        if dry_run:
            return report
        hasher = BaseHasher()
        stream = _merged_tensors(plan, recipe, density, dtype, hasher, report, progress)
        write_model_dir(
            out,
            plan.base,
            stream,
            float_dtype=dtype,
            extra_files=lambda: (
                _finish(report, hasher, started) | _config_with_dtype(plan.base, dtype)
            ),
        )
        return report
    finally:
        for src in plan.sources:
            src.close()


def _finish(report: MergeReport, hasher: BaseHasher, started: float) -> dict[str, bytes]:
    report.child_id = hasher.hexdigest()
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
    hasher: BaseHasher,
    report: MergeReport,
    progress: Callable[[int], None] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    weights = [i.weight for i in plan.inputs]
    densities = [i.density if i.density is not None else density for i in plan.inputs]
    presparsified = [s.presparsified for s in plan.sources]
    for name in plan.base.names():
        info = plan.base.tensors[name]
        tensor = plan.base.tensor(name)
        if info.dtype not in FLOAT_DTYPES:
            for src in plan.sources:
                src.check_unchanged(name, tensor)
        else:
            if not all_finite(tensor):
                raise BaseMismatchError(
                    f"{plan.base.path}: base tensor {name!r} contains NaN or Inf"
                )
            tensor = _merge_one(
                name, tensor, plan, weights, densities, presparsified, recipe, report
            )
            tensor = tensor.to(DTYPES[dtype or info.dtype])
            if not all_finite(tensor):
                raise EncodeError(
                    f"tensor {name!r}: the merged values overflow {dtype or info.dtype}"
                )
        hasher.update(name, DTYPE_NAMES[tensor.dtype], tensor)
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
) -> torch.Tensor:
    if not any(src.touches(name) for src in plan.sources):  # e.g. LoRA on other modules only
        report.tensors[name] = _stats_row(TensorStats(0.0, 0.0))
        return tensor
    base32 = tensor.to(torch.float32)  # task vectors and their merge are float32

    def task_vectors() -> Iterator[torch.Tensor]:
        for src in plan.sources:
            tv = src.task_vector(name, base32)
            yield torch.zeros_like(base32) if tv is None else tv

    merged, stats = merge_tensor(
        name, task_vectors(), weights, densities, recipe, presparsified=presparsified
    )
    report.tensors[name] = _stats_row(stats)
    if tensor.dtype == torch.float64:  # keep the base's precision where it has more
        return tensor.add_(merged)
    return base32.add_(merged)


def _stats_row(stats: TensorStats) -> dict:
    return {
        "kept_fraction": round(stats.kept_fraction, 6),
        "conflict_rate": round(stats.conflict_rate, 6),
    }
