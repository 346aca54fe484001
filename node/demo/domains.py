"""Kinds of text that ship with Python itself: the demo's and the quality benchmark's domains.

Nothing is downloaded: the reference manual (``pydoc_data``), the standard
library's source code and docstrings, and Python's licence. Each domain is a
deterministic list of chunks of roughly ``chunk_chars`` characters.
"""

from __future__ import annotations

import importlib
import inspect
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

MODULES = (
    "argparse", "textwrap", "string", "json.decoder", "json.encoder", "csv", "shutil",
    "tempfile", "pathlib", "dataclasses", "functools", "heapq", "bisect", "fractions",
    "statistics", "calendar", "difflib", "enum", "queue", "logging", "zipfile", "gzip",
)  # fmt: skip


def _chunks(parts: Iterator[str], chunk_chars: int) -> list[str]:
    out, current = [], ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        current = f"{current}\n{part}" if current else part
        if len(current) >= chunk_chars:
            out.append(current[: 2 * chunk_chars])
            current = ""
    if current:
        out.append(current)
    return out


def manual() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from topics[name].split("\n\n")


def code() -> Iterator[str]:
    for name in MODULES:
        source = Path(importlib.import_module(name).__file__).read_text()
        yield from source.split("\n\n")


def docs() -> Iterator[str]:
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__:
                yield inspect.cleandoc(obj.__doc__)


def license_text() -> Iterator[str]:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    yield from path.read_text().split("\n\n")


DOMAINS: dict[str, Callable[[], Iterator[str]]] = {
    "manual": manual,
    "code": code,
    "docs": docs,
    "license": license_text,
}


def domain_texts(name: str, *, chunk_chars: int = 320, limit: int = 400) -> list[str]:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return _chunks(DOMAINS[name](), chunk_chars)[:limit]
