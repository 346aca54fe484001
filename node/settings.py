"""Daemon settings from one pydantic model: defaults < TOML file < ``MERGESWARM_*`` env < flags.

Each field of the model becomes a flag (``lora_rank`` -> ``--lora-rank``)
whose help shows the field's description and default, an environment
variable (``MERGESWARM_LORA_RANK``) and a TOML key (``lora_rank``). A wrong
key or value, wherever it came from, is one line naming where and what.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from protocol.errors import MergeswarmError, one_line

ENV_PREFIX = "MERGESWARM_"


class SettingsError(MergeswarmError):
    """A setting is unknown or has a wrong value."""


def _kind(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if origin in (typing.Union, types.UnionType) and args:
        return _kind(args[0])
    if origin is typing.Literal:
        return type(args[0]), False
    return annotation, False


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    skip: frozenset[str] = frozenset(),
    title: str = "settings (flags > MERGESWARM_* env > --config file)",
) -> None:
    """One flag per field; flags default to None so that only given ones override."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if name in skip or extra.get("cli") is False:
            continue
        flag = "--" + str(extra.get("flag", name)).replace("_", "-")
        scalar, is_list = _kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        text = f"{field.description or ''} (default: {default})".strip().replace("%", "%%")
        metavar = str(extra.get("metavar", name.upper()))
        if scalar is bool and not is_list:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif is_list:
            group.add_argument(
                flag,
                dest=name,
                action="append",
                default=None,
                metavar=metavar,
                help=text + "; repeatable",
            )
        else:
            literal = typing.get_origin(field.annotation) is typing.Literal
            choices = typing.get_args(field.annotation) if literal else None
            if choices and "metavar" not in extra:
                metavar = "{" + ",".join(map(str, choices)) + "}"  # --help lists them
            group.add_argument(
                flag, dest=name, default=None, metavar=metavar, choices=choices, help=text
            )


def load_settings(
    model: type[BaseModel],
    args: argparse.Namespace,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> BaseModel:
    """Merge defaults, the TOML file, the environment and the flags, then validate once."""
    values: dict[str, Any] = {}
    fields = model.model_fields
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"{config_file}: {exc}") from None
        for key, value in data.items():
            if key not in fields:
                raise SettingsError(f"{config_file}: unknown setting {key!r}")
            values[key] = value
    for name, field in fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _from_env(name, raw, field.annotation)
    for name in fields:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(_where(one_line(exc), config_file)) from None


def _from_env(name: str, raw: str, annotation: Any) -> Any:
    scalar, is_list = _kind(annotation)
    if is_list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if scalar is bool:
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected true or false")
        return lowered in ("1", "true", "yes")
    return raw


def _where(message: str, config_file: Path | None) -> str:
    key = message.split(":", 1)[0]
    sources = f"--{key.replace('_', '-')}, {ENV_PREFIX}{key.upper()}"
    if config_file is not None:
        sources += f" or {config_file}"
    return f"setting {message} (set by {sources})"
