"""Daemon settings: flags > MERGESWARM_* environment > TOML file > defaults, errors named."""

from __future__ import annotations

import argparse

import pytest

from node.config import VolunteerSettings
from node.settings import SettingsError, add_flags, load_settings
from protocol.constants import CODEC_NAMES, DEFAULT_CODEC
from protocol.swarm_config import SwarmConfig


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, VolunteerSettings)
    return parser.parse_args(list(argv))


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('lr = 0.01\nbatch_size = 2\nround_steps = 7\ndata = ["a.jsonl"]\n')
    env = {"MERGESWARM_BATCH_SIZE": "3", "MERGESWARM_ROUND_STEPS": "9", "MERGESWARM_LORA": "true"}
    settings = load_settings(
        VolunteerSettings, _parse("--round-steps", "11"), config_file=config, environ=env
    )
    assert settings.lr == 0.01  # file
    assert settings.batch_size == 3  # env over file
    assert settings.round_steps == 11  # flag over env and file
    assert settings.lora is True and settings.data == ["a.jsonl"]
    assert settings.codec == DEFAULT_CODEC  # default


def test_list_settings_come_from_repeated_flags_or_comma_separated_env():
    settings = load_settings(
        VolunteerSettings,
        _parse("--join", "/ip4/1.2.3.4/tcp/1/p2p/Qm1", "--join", "/ip4/1.2.3.4/tcp/2/p2p/Qm2"),
        environ={"MERGESWARM_LORA_TARGETS": "q_proj, v_proj"},
    )
    assert len(settings.join) == 2 and settings.lora_targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("toml", "env", "argv", "message"),
    [
        ("surprise = 1\n", {}, (), "unknown setting 'surprise'"),
        ("", {"MERGESWARM_DROP_RATE": "1.5"}, (), "setting drop_rate: .*MERGESWARM_DROP_RATE"),
        ("", {"MERGESWARM_LORA": "maybe"}, (), "MERGESWARM_LORA='maybe': expected true or false"),
        ("batch_size = 0\n", {}, (), "setting batch_size: .*node.toml"),
        ("lr = [\n", {}, (), "node.toml"),
    ],
)
def test_a_wrong_setting_is_named_with_where_it_can_come_from(tmp_path, toml, env, argv, message):
    config = tmp_path / "node.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        load_settings(VolunteerSettings, _parse(*argv), config_file=config, environ=env)


def test_a_wrong_flag_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse("--codec", "zip")
    assert "invalid choice: 'zip'" in capsys.readouterr().err


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_codec_is_a_setting_of_the_swarm_and_of_a_volunteer(codec):
    config = SwarmConfig(swarm_id="swarm-test", genesis_id="ef" * 32, codec=codec)
    assert config.codec == codec
    assert load_settings(VolunteerSettings, _parse("--codec", codec), environ={}).codec == codec
