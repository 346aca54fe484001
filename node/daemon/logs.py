"""Log output: readable lines on a terminal, one JSON object per line otherwise.

Daemons run under systemd, docker or a test harness far more often than in a
terminal, and their logs are read by machines there; ``MERGESWARM_LOG_FORMAT``
(``text`` or ``json``) overrides the choice. A call site adds fields to the
JSON object with ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

ENV_FORMAT = "MERGESWARM_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def use_json(stream: TextIO) -> bool:
    choice = os.environ.get(ENV_FORMAT, "").strip().lower()
    if choice in ("json", "text"):
        return choice == "json"
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure(verbose: bool, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines() if use_json(stream) else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
