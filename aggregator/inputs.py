"""Where task vectors come from: fine-tuned model directories, .msd deltas, LoRA adapters.

Each source yields, tensor by tensor, the float32 task vector ``theta - base``
(``None`` where it does not touch a tensor) and has an order key by which the
engine orders inputs, so the result does not depend on the order given. The
key is the content id, except for full model directories, where hashing
every byte would cost one more read of each input: their key is a
fingerprint of sampled bytes, and the engine falls back to the full id only
when two fingerprints are equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from protocol.container import DeltaReader
from protocol.delta import check_fits
from protocol.errors import BaseMismatchError, ModelDirError
from protocol.ids import base_id, file_id
from protocol.model_dir import FLOAT_DTYPES, ModelDir
from protocol.numerics import all_finite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# A model fingerprint reads this many bytes at each of this many places per tensor.
_SAMPLE_BYTES = 64
_SAMPLES = 64


class TaskVectorSource(ABC):
    """One merge input."""

    kind: str
    presparsified = False  # already DARE-sparse: dare methods do not drop again
    needs_base_id = False  # check() compares the base id (which costs a read of the base)

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abstractmethod
    def id(self) -> str:
        """Content id (SHA-256 hex): equal ids mean the same input."""

    @property
    def order_key(self) -> str:
        """Sorts inputs; a function of the content, and equal for equal content."""
        return self.id

    @abstractmethod
    def check(self, base: ModelDir, base_hex: str | None) -> None:
        """Raise BaseMismatchError (naming this input) unless it fits ``base``."""

    @abstractmethod
    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """float32 ``theta - base`` for one tensor, or None where this input changes nothing."""

    def check_unchanged(self, name: str, base: torch.Tensor) -> None:  # noqa: B027
        """Raise unless this input leaves the non-float tensor ``name`` as the base has it."""

    def touches(self, name: str) -> bool:
        """Whether this input may change tensor ``name`` (False: its task vector is zero)."""
        return True

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        pass


class ModelSource(TaskVectorSource):
    """A full fine-tuned model directory with the base's architecture."""

    kind = "model"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.model = ModelDir(path)
        self._id: str | None = None
        self._fingerprint: str | None = None

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = base_id(self.model)
        return self._id

    @property
    def order_key(self) -> str:
        """A fingerprint: names, dtypes, shapes and bytes sampled at fixed places of each tensor."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"mergeswarm/model-fingerprint/v1\n")
            for name in self.model.names():
                info = self.model.tensors[name]
                h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0".encode())
                step = max(info.nbytes // _SAMPLES, 1)
                for start in range(0, info.nbytes, step):
                    h.update(self.model.read_range(name, start, _SAMPLE_BYTES))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check(self, base: ModelDir, base_hex: str | None) -> None:
        for name, info in base.tensors.items():
            other = self.model.tensors.get(name)
            if other is None:
                raise BaseMismatchError(f"{self.path}: tensor {name!r} of the base is missing")
            if (other.dtype in FLOAT_DTYPES) != (info.dtype in FLOAT_DTYPES):
                raise BaseMismatchError(
                    f"{self.path}: tensor {name!r} is {other.dtype}, the base has {info.dtype}"
                )
            if other.shape != info.shape:
                raise BaseMismatchError(
                    f"{self.path}: tensor {name!r} has shape {list(other.shape)}, the base has {list(info.shape)}"
                )
        extra = sorted(set(self.model.tensors) - set(base.tensors))
        if extra:
            raise BaseMismatchError(f"{self.path}: tensor {extra[0]!r} is not in the base")

    def check_unchanged(self, name: str, base: torch.Tensor) -> None:
        other = self.model.tensor(name)
        if other.dtype != base.dtype or not torch.equal(other, base):
            raise BaseMismatchError(
                f"{self.path}: non-float tensor {name!r} differs from the base; only floating-point weights merge"
            )

    def close(self) -> None:
        self.model.close()

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        theta = self.model.tensor(name).to(torch.float32)
        if not all_finite(theta):
            raise BaseMismatchError(f"{self.path}: tensor {name!r} contains NaN or Inf")
        return theta.sub_(base)


class DeltaSource(TaskVectorSource):
    """A signed ``.msd`` delta (already DARE-sparsified)."""

    kind = "delta"
    presparsified = True
    needs_base_id = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reader = DeltaReader(path)

    @property
    def id(self) -> str:
        return self.reader.id

    def check(self, base: ModelDir, base_hex: str | None) -> None:
        if base_hex is None:
            raise ValueError("a delta is checked against the base id")
        check_fits(self.reader, base, base_hex)

    def touches(self, name: str) -> bool:
        return name in self.reader

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.reader.read_tensor(name) if name in self.reader else None

    def close(self) -> None:
        self.reader.close()


class LoraSource(TaskVectorSource):
    """A PEFT LoRA adapter directory, expanded per target module to ``scale * B @ A``."""

    kind = "lora"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.config = _adapter_config(path / ADAPTER_CONFIG)
        self.weights_path = path / ADAPTER_WEIGHTS
        try:
            self._file = safe_open(self.weights_path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ModelDirError(
                f"{self.weights_path}: not a readable safetensors file ({exc})"
            ) from None
        self.modules = self._pair_modules(list(self._file.keys()))

    def _pair_modules(self, keys: list[str]) -> dict[str, tuple[str, str]]:
        """Base tensor name -> (lora_A key, lora_B key); every key must be such a weight."""
        pairs: dict[str, tuple[str, str]] = {}
        for key in keys:
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                if module + ".lora_B.weight" not in keys:
                    raise ModelDirError(f"{self.weights_path}: {key} has no matching lora_B")
                name = module.removeprefix(_PEFT_PREFIX) + ".weight"
                pairs[name] = (key, module + ".lora_B.weight")
            elif key.endswith(".lora_B.weight"):
                if key.removesuffix(".lora_B.weight") + ".lora_A.weight" not in keys:
                    raise ModelDirError(f"{self.weights_path}: {key} has no matching lora_A")
            else:  # lora_embedding_A/B, LoRA biases, saved modules: not expanded here
                raise ModelDirError(
                    f"{self.weights_path}: {key} is not a LoRA A/B weight; only linear-layer LoRA is supported"
                )
        if not pairs:
            raise ModelDirError(f"{self.weights_path}: no lora_A/lora_B pairs found")
        return pairs

    @property
    def id(self) -> str:
        h = hashlib.sha256((self.path / ADAPTER_CONFIG).read_bytes())
        h.update(bytes.fromhex(file_id(self.weights_path)))
        return h.hexdigest()

    def check(self, base: ModelDir, base_hex: str | None) -> None:
        for name, (a_key, b_key) in self.modules.items():
            info = base.tensors.get(name)
            if info is None:
                raise BaseMismatchError(f"{self.path}: LoRA targets {name!r}, which the base lacks")
            a, b = self._file.get_slice(a_key).get_shape(), self._file.get_slice(b_key).get_shape()
            if len(a) != 2 or len(b) != 2:
                raise BaseMismatchError(
                    f"{self.path}: LoRA for {name!r} has A{list(a)} B{list(b)}: not matrices"
                )
            out_in = (b[0], a[1])
            if self.config.get("fan_in_fan_out"):
                out_in = out_in[::-1]
            if a[0] != b[1] or tuple(info.shape) != out_in:
                raise BaseMismatchError(
                    f"{self.path}: LoRA for {name!r} has A{list(a)} B{list(b)}, the base tensor is {list(info.shape)}"
                )

    def _scale(self, name: str, rank: int) -> float:
        alpha = self.config.get("lora_alpha", rank)
        module = name.removesuffix(".weight")
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's rule; the first match wins
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def touches(self, name: str) -> bool:
        return name in self.modules

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        pair = self.modules.get(name)
        if pair is None:
            return None
        a = self._file.get_tensor(pair[0]).to(torch.float32)  # (r, in)
        b = self._file.get_tensor(pair[1]).to(torch.float32)  # (out, r)
        delta = (b @ a) * self._scale(name, a.shape[0])
        if self.config.get("fan_in_fan_out"):
            delta = delta.T.contiguous()
        if not all_finite(delta):
            raise BaseMismatchError(f"{self.path}: LoRA for {name!r} contains NaN or Inf")
        return delta

    def close(self) -> None:
        self._file = None


def _adapter_config(path: Path) -> dict:
    """A PEFT LoRA adapter config, checked for what the expansion relies on."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path}: unreadable adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: an adapter config must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelDirError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    for option in ("use_dora", "modules_to_save"):
        if config.get(option):
            raise ModelDirError(f"{path}: LoRA option {option!r} is not supported")
    alphas = [config.get("lora_alpha", 1), *(config.get("alpha_pattern") or {}).values()]
    if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in alphas):
        raise ModelDirError(f"{path}: lora_alpha and alpha_pattern values must be numbers")
    return config


def open_source(path: str | os.PathLike[str]) -> TaskVectorSource:
    """Pick the source type from what is at ``path``."""
    p = Path(path)
    if p.is_file():
        return DeltaSource(p)
    if (p / ADAPTER_CONFIG).is_file():
        return LoraSource(p)
    if p.is_dir():
        return ModelSource(p)
    raise ModelDirError(f"{p}: no such model directory, adapter directory or .msd file")
