"""The exceptions protocol code raises; every message names the input and the problem."""

from __future__ import annotations


def one_line(exc: ValueError, default_where: str = "") -> str:
    """``where: problem`` for the first error of a pydantic ValidationError, or any ValueError."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    first = errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or default_where
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class MergeswarmError(Exception):
    """Base of every error mergeswarm reports to a user instead of a traceback."""


class ModelDirError(MergeswarmError):
    """A model directory is missing, incomplete or not safetensors."""


class IdentityError(MergeswarmError):
    """A key file cannot be created, read or parsed."""


class DeltaFormatError(MergeswarmError):
    """A .msd file is malformed: bad magic, version, header, sizes or payload."""


class UnsupportedVersionError(DeltaFormatError):
    """The file declares a format version or codec this build does not know."""


class SignatureError(DeltaFormatError):
    """The header signature does not verify against the declared author."""


class IntegrityError(DeltaFormatError):
    """A payload frame does not match the hash or size its header declares."""


class NonFiniteError(DeltaFormatError):
    """Decoded or to-be-encoded values contain NaN or Inf."""


class EncodeError(MergeswarmError):
    """Values or names cannot be written in the requested format (range, size, schema)."""


class BaseMismatchError(MergeswarmError):
    """A delta does not fit the base it is applied to (id, names, shapes or dtypes)."""
