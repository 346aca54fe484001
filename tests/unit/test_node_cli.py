"""`mergeswarm node` refuses what it cannot use in one line, before it joins anything."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such data file"),
        ("", "the data file is empty"),
        ("{not json\n", "data.jsonl:1: not a JSON line"),
        ('{"title": "x"}\n', 'data.jsonl:1: expected {"text": ...}'),
    ],
)
def test_bad_data_is_one_clear_line_before_joining(tmp_path, cli, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = cli("node", "--data-dir", tmp_path / "d", "--data", path)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("mergeswarm: error: ") and message in err[0]
    assert not (tmp_path / "d" / "identity.pem").exists()  # it joined nothing
