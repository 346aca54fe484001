"""The codec benchmark still runs end to end (figures are its output, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_codec.py"


@pytest.mark.slow
def test_bench_codec_smoke_run_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--scale",
            "0.002",
            "--p",
            "0.9",
            "--codecs",
            "bf16",
            "int8",
            "--skip-real",
            "--json",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## Targets (synthetic model)" in proc.stdout
    (synthetic,) = json.loads(out.read_text())
    assert [(r["p"], r["codec"]) for r in synthetic["rows"]] == [(0.9, "bf16"), (0.9, "int8")]
    for row in synthetic["rows"]:
        assert row["enc"]["params"] == row["dec"]["params"] == synthetic["params"]
        assert 0 < row["enc"]["bytes"] < row["coo"]["enc"]["bytes"]
