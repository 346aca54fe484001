"""Merge configuration: mergekit's YAML schema for the methods both have, plus ours.

A mergekit user's config works as is and keeps mergekit's meaning: weights
enter the sign vote, ``normalize`` and DARE ``rescale`` (to the task
vector's L1 norm) default as in mergekit, and a model listed as
``base_model`` among ``models`` is skipped (``linear`` averages it in). Our additions:
``models[].model`` may be a ``.msd`` delta or a LoRA adapter directory;
``parameters`` may hold ``drop_rate`` (DARE p, i.e. density = 1 - p),
``seed`` (DARE masks), ``sign_method`` (``total`` | ``frequency``) and
``weighted_vote`` (false for the TIES paper's unweighted vote), ``entry_clip``
(bound every entry by that many times the tensor's robust scale), and the robust
methods ``trimmed_mean`` (``trim``), ``median`` and ``centered_clip``
(``clip_radius``, ``clip_iterations``). A mergekit
option we do not implement is refused by name, never ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator.engine import MergeInput
from aggregator.methods import Recipe
from protocol.errors import MergeswarmError, one_line

# mergekit options that change results and that mergeswarm does not implement.
MERGEKIT_ONLY = {
    "slices": "layer slicing",
    "tokenizer_source": "tokenizer merging",
    "tokenizer": "tokenizer merging",
    "chat_template": "chat templates",
    "out_dtype": "a separate output dtype (use dtype)",
    "modules": "per-module configs",
    "gamma": "breadcrumbs outlier trimming",
    "epsilon": "DELLA",
    "filter": "per-tensor parameter filters",
    "t": "slerp",
}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
Density = Annotated[float, Field(gt=0.0, le=1.0)]


class ConfigError(MergeswarmError):
    """A merge config is malformed or asks for something mergeswarm does not do."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_mergekit_only(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in data:
                if key in MERGEKIT_ONLY:
                    raise ValueError(
                        f"mergekit option {key!r} ({MERGEKIT_ONLY[key]}) is not supported by mergeswarm"
                    )
        return data


class ModelParameters(_Strict):
    weight: float = 1.0  # multiplies this input's task vector
    density: Density | None = None  # keep fraction (ties: by magnitude; dare: at random)


class ModelEntry(_Strict):
    model: str  # a local model directory, LoRA adapter directory or .msd delta
    parameters: ModelParameters = ModelParameters()


class GlobalParameters(_Strict):
    normalize: bool | None = None  # divide by the (agreeing) weights; default per method
    lam: float | None = Field(None, alias="lambda")  # scales the merged task vector (default 1)
    rescale: bool | None = None  # dare methods: rescale survivors to the L1 norm (default true)
    int8_mask: bool = False  # a mergekit memory option; results are the same without it
    weight: float | None = None  # default weight of every model
    density: Density | None = None  # default density of every model
    drop_rate: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # ours: DARE p = 1 - density
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0  # ours: DARE mask seed
    sign_method: Literal["total", "frequency"] = "total"  # ours: TIES sign election
    weighted_vote: bool = True  # ours: false gives the TIES paper's unweighted vote
    entry_clip: Annotated[float, Field(gt=0)] | None = None  # ours: per-entry bound
    trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.2  # ours: trimmed_mean's cut at each end
    clip_radius: Annotated[float, Field(gt=0)] = 1.0  # ours: centered_clip's radius
    clip_iterations: Annotated[int, Field(ge=1, le=100)] = 3  # ours: centered_clip's steps


class MergeConfig(_Strict):
    merge_method: Literal[
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "trimmed_mean",
        "median",
        "centered_clip",
    ]
    base_model: str
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    parameters: GlobalParameters = GlobalParameters()
    dtype: Literal["float32", "float16", "bfloat16"] | None = (
        None  # output dtype; default: the base's
    )
    name: str | None = None  # free label, as in mergekit

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        if self.parameters.drop_rate is not None and self.parameters.density is not None:
            raise ValueError("give either parameters.drop_rate or parameters.density, not both")
        if self.merge_method == "linear" and self.parameters.normalize is False:
            # mergekit then sums whole models, not task vectors: a different operation.
            raise ValueError("linear with normalize: false is not supported; use task_arithmetic")
        robust = self.merge_method in ("trimmed_mean", "median", "centered_clip")
        if robust and self.parameters.normalize is False:
            raise ValueError(f"{self.merge_method} is an average: it takes no normalize: false")
        if self.merge_method == "linear" and self.parameters.lam is not None:
            raise ValueError("linear takes no lambda (as in mergekit); use task_arithmetic")
        if self.parameters.rescale is not None and not self.merge_method.startswith("dare"):
            raise ValueError(f"rescale applies to dare methods only, not {self.merge_method}")
        return self

    def recipe(self) -> Recipe:
        p = self.parameters
        return Recipe(
            method=self.merge_method,
            lam=1.0 if p.lam is None else p.lam,
            normalize=p.normalize,
            sign_method=p.sign_method,
            weighted_vote=p.weighted_vote,
            dare_rescale="none" if p.rescale is False else "l1",
            seed=p.seed,
            entry_clip=p.entry_clip,
            trim=p.trim,
            clip_radius=p.clip_radius,
            clip_iterations=p.clip_iterations,
        )

    def default_density(self) -> float:
        p = self.parameters
        if p.drop_rate is not None:
            return 1.0 - p.drop_rate
        return p.density if p.density is not None else 1.0

    def inputs(self) -> list[MergeInput]:
        """The merge inputs, as mergekit reads them.

        The base listed among ``models`` is skipped (its task vector is zero),
        except for ``linear``, where mergekit averages whole models and the base
        counts with its weight; there it is added even when not listed, which
        then needs a global weight.
        """
        base = _resolve(self.base_model, "base_model")
        out, base_listed = [], False
        for entry in self.models:
            path = _resolve(entry.model, "models[].model")
            weight = entry.parameters.weight
            if (
                "weight" not in entry.parameters.model_fields_set
                and self.parameters.weight is not None
            ):
                weight = self.parameters.weight
            if path == base:
                base_listed = True
                if self.merge_method != "linear":
                    continue
            out.append(MergeInput(path, weight, entry.parameters.density))
        if self.merge_method == "linear" and not base_listed:
            if self.parameters.weight is None:
                raise ConfigError(
                    "linear averages the base model too (as mergekit does): list it under models "
                    "with a weight, or give parameters.weight"
                )
            out.append(MergeInput(base, self.parameters.weight, None))
        if all(i.path == base for i in out):
            raise ConfigError("models lists only the base model: nothing to merge")
        return out

    @property
    def output_dtype(self) -> str | None:
        return DTYPE_NAMES[self.dtype] if self.dtype else None


def _resolve(text: str, where: str) -> Path:
    path = Path(os.path.expanduser(text)).resolve()
    if not path.exists():
        raise ConfigError(
            f"{where}: {text!r} is not a local path (mergeswarm works offline: download hub models first)"
        )
    return path


def load_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Read and validate a YAML merge config; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {one_line(exc, 'config')}") from None
