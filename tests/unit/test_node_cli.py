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


def test_an_aggregator_with_a_bad_volunteer_list_says_so_before_joining(tmp_path, cli, tiny_base):
    config = tmp_path / "swarm.toml"
    assert cli("init", "--genesis", tiny_base, "-o", config)[0] == 0
    listed = tmp_path / "volunteers.txt"
    listed.write_text("not-a-key\n")
    args = ("aggregator", "--config", config, "--data-dir", tmp_path / "a")
    code, _, err = cli(*args, "--volunteers", listed, "--genesis", tiny_base)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("mergeswarm: error: --volunteers") and "not-a-key" in err[0]
    code, _, err = cli(*args, "--volunteers", tmp_path / "missing.txt")
    assert code == 1 and "missing.txt" in err[0]
    assert not (tmp_path / "a" / "identity.pem").exists()  # it joined nothing
