"""Log lines: JSON objects when nobody watches a terminal, text when asked."""

from __future__ import annotations

import io
import json
import logging

import pytest

from node.daemon import logs


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_log_lines_off_a_terminal_are_json_objects_with_their_fields(monkeypatch):
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    out = io.StringIO()
    logs.configure(verbose=False, stream=out)
    log = logging.getLogger("mergeswarm.test")
    log.info("round %d done", 3, extra={"fields": {"round": 3, "loss": 1.5}})
    log.debug("hidden unless verbose")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it broke")
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert lines[0]["msg"] == "round 3 done" and lines[0]["level"] == "info"
    assert lines[0]["round"] == 3 and lines[0]["loss"] == 1.5
    assert lines[0]["logger"] == "mergeswarm.test"
    assert len(lines) == 2 and "ValueError: boom" in lines[1]["exc"]


def test_the_format_can_be_forced_to_text(monkeypatch):
    monkeypatch.setenv(logs.ENV_FORMAT, "text")
    out = io.StringIO()
    logs.configure(verbose=True, stream=out)
    logging.getLogger("mergeswarm.test").debug("plain %s", "words")
    assert out.getvalue().rstrip().endswith("DEBUG mergeswarm.test: plain words")
