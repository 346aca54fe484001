"""A swarm's config: written by ``mergeswarm init``, read back equal, refused when wrong."""

from __future__ import annotations

import subprocess

import pytest

from protocol.identity import Identity
from protocol.ids import base_id
from protocol.records import MAX_RECORD_BYTES, open_record, sign_record
from protocol.swarm_config import SwarmConfig, SwarmConfigError, load_swarm_config, parse_config
from tests.swarm import run_mergeswarm

GENESIS = "ab" * 32
NOW = 1_000_000.0


def _required(**values) -> dict:
    return {"swarm_id": "test-swarm", "genesis_id": GENESIS, **values}


def _unusual() -> SwarmConfig:
    """A config whose every field differs from its default."""
    return parse_config(
        _required(
            merge_method="dare_ties",
            density=0.3,
            lam=1.5,
            sign_method="frequency",
            outer_optimizer="none",
            outer_lr=0.5,
            outer_momentum=0.8,
            outer_warmup=3,
            drop_rate=0.0,
            codec="int8",
            error_feedback=True,
            round_period=12.5,
            min_deltas=3,
            max_deltas=7,
            staleness=0,
            staleness_discount=0.25,
            on_new_head="restart",
            norm_factor=4.0,
            norm_action="clip",
            entry_clip=0.0,
            gain_share=0.5,
            newcomer_share=0.5,
            max_delta_bytes=123_456_789,
            snapshot_every=2,
            aggregators=["01" * 32, "fe" * 32],
            swarm_id="test-swarm-t0123456789abcdef",  # epochs past 0 need an anchored id
            epoch=2,  # handed over twice (checked against the configs before, not here)
        ),
        "test",
    )


@pytest.mark.parametrize("config", [_unusual(), parse_config(_required(), "defaults")])
def test_to_toml_then_load_gives_back_an_equal_config(config, tmp_path):
    path = tmp_path / "swarm.toml"
    path.write_text(config.to_toml())
    assert load_swarm_config(path) == config


def test_unusual_config_differs_from_the_defaults_in_every_field():
    # keeps the round-trip test honest: no field of _unusual() hides behind its default
    defaults, unusual = parse_config(_required(), "d"), _unusual()
    same = [f for f in SwarmConfig.model_fields if getattr(defaults, f) == getattr(unusual, f)]
    assert same == ["version", "genesis_id"]


def test_flag_strings_and_lists_are_coerced():
    config = parse_config(
        _required(density="0.3", max_deltas="12", round_period="12", aggregators=["01" * 32]),
        "flags",
    )
    assert config.density == 0.3
    assert config.max_deltas == 12 and isinstance(config.max_deltas, int)
    assert config.round_period == 12.0 and isinstance(config.round_period, float)
    assert config.aggregators == ("01" * 32,)


def test_a_fractional_count_is_refused():
    with pytest.raises(SwarmConfigError, match="flags: max_deltas"):
        parse_config(_required(max_deltas="12.5"), "flags")


def test_min_deltas_above_max_deltas_is_refused_by_name():
    with pytest.raises(SwarmConfigError) as info:
        parse_config(_required(min_deltas=5, max_deltas=4), "swarm.toml")
    message = str(info.value)
    assert message.startswith("swarm.toml: ")
    assert "min_deltas 5" in message and "max_deltas 4" in message
    assert parse_config(_required(min_deltas=4, max_deltas=4), "ok").min_deltas == 4


def test_an_unknown_key_is_refused_by_name():
    with pytest.raises(SwarmConfigError, match="swarm.toml: merge_methd: Extra inputs"):
        parse_config(_required(merge_methd="ties"), "swarm.toml")


def test_an_out_of_range_value_is_refused_by_name():
    with pytest.raises(SwarmConfigError, match="drop_rate"):
        parse_config(_required(drop_rate=1.0), "swarm.toml")


def test_a_missing_file_says_to_run_init(tmp_path):
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(SwarmConfigError, match="mergeswarm init") as info:
        load_swarm_config(missing)
    assert str(missing) in str(info.value)


def test_a_file_that_is_not_toml_is_refused(tmp_path):
    path = tmp_path / "swarm.toml"
    path.write_text("lam = = 1\n")
    with pytest.raises(SwarmConfigError, match="not a readable TOML file"):
        load_swarm_config(path)


def test_a_wrong_value_in_a_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "swarm.toml"
    path.write_text(parse_config(_required(), "d").to_toml().replace("lam = 1.0", "lam = 11.0"))
    with pytest.raises(SwarmConfigError, match=f"{path}: lam"):
        load_swarm_config(path)


def test_an_epoch_past_0_needs_an_anchored_swarm_id():
    with pytest.raises(SwarmConfigError, match="trust anchor"):
        parse_config(_required(epoch=1), "test")


def test_no_aggregators_trusts_anyone():
    config = parse_config(_required(), "open")
    assert config.trusts("01" * 32) and config.trusts("fe" * 32)


def test_listed_aggregators_are_the_only_ones_trusted():
    config = parse_config(_required(aggregators=["01" * 32, "02" * 32]), "closed")
    assert config.trusts("01" * 32) and config.trusts("02" * 32)
    assert not config.trusts("03" * 32)


def test_a_config_signed_as_a_record_opens_to_an_equal_body():
    identity = Identity.generate()
    # a config record holds epoch 0 only, signed by an aggregator it names (epochs past 0
    # travel inside handovers)
    values = _unusual().model_dump(mode="json") | {"swarm_id": "test-swarm", "epoch": 0}
    config = parse_config(values | {"aggregators": [identity.author, "fe" * 32]}, "t")
    key, data = sign_record(identity, config.swarm_id, "config", "", config, NOW + 60)
    _, body = open_record(
        data,
        subkey=identity.author,
        expiration=NOW + 60,
        now=NOW,
        key=key,
        swarm_id=config.swarm_id,
    )
    assert body == config


def test_a_config_with_the_most_aggregators_fits_in_a_record():
    identity = Identity.generate()
    most = SwarmConfig.model_fields["aggregators"].metadata[0].max_length
    assert most == 16
    signer_first = [identity.author] + [f"{i:064x}" for i in range(most - 1)]
    config = parse_config(_required(aggregators=signer_first), "t")
    _, data = sign_record(identity, config.swarm_id, "config", "", config, NOW + 60)
    assert len(data) <= MAX_RECORD_BYTES
    _, body = open_record(data, subkey=identity.author, expiration=NOW + 60, now=NOW)
    assert body == config


def test_a_value_no_signed_record_could_hold_is_refused():
    for value in ("inf", "nan"):  # canonical JSON has neither, so no peer could publish it
        with pytest.raises(SwarmConfigError, match="norm_factor"):
            parse_config(_required(norm_factor=value), "flags")


def _init(*args) -> subprocess.CompletedProcess:
    return run_mergeswarm(["init", *args], timeout=120)


def test_init_writes_a_config_that_loads_with_the_given_flags(tiny_base, tmp_path):
    output, agg = tmp_path / "swarm.toml", tmp_path / "agg"
    args = ["--genesis", tiny_base, "-o", output, "--round-period", "12", "--lambda", "1.5"]
    proc = _init(*args, "--aggregator-dir", agg)
    assert proc.returncode == 0, proc.stderr
    config = load_swarm_config(output)
    assert config.genesis_id == base_id(tiny_base)
    assert config.lam == 1.5
    assert config.round_period == 12.0
    assert config.aggregators == (Identity.load(agg / "identity.pem").author,)

    written = output.read_text()
    again = _init(*args)
    assert again.returncode == 1
    lines = again.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeswarm: error:"), again.stderr
    assert str(output) in lines[0]
    assert output.read_text() == written


def test_a_handover_of_sixteen_aggregators_travels_through_a_real_dht(local_peer, tmp_path):
    from node.chain.history import find_config
    from node.data_dir import DataDir
    from protocol.handover import Handover, config_digest, endorse
    from protocol.records import CONFIG, HANDOVER
    from protocol.swarm_config import anchored_swarm_id

    # the writer is one of the aggregators: a config record stands only from one it names
    keys = [Identity.load_or_create(DataDir(tmp_path / "writer").identity)]
    keys += [Identity.generate() for _ in range(15)]
    authors = [k.author for k in keys]
    swarm_id = anchored_swarm_id("test-swarm", GENESIS, authors)
    root = parse_config({"swarm_id": swarm_id, "genesis_id": GENESIS, "aggregators": authors}, "t")
    successors = sorted(Identity.generate().author for _ in range(16))
    values = root.model_dump(mode="json") | {"epoch": 1, "aggregators": successors}
    nxt = parse_config(values, "next")
    handover = Handover(
        previous=root, config=nxt, endorsements=tuple(endorse(k, root, nxt) for k in keys)
    )
    writer = local_peer("writer", swarm_id=swarm_id)
    assert writer.publish(CONFIG, root, ttl=600)
    assert writer.publish(HANDOVER, handover, topic=config_digest(root), ttl=600)
    reader = local_peer("reader", swarm_id=swarm_id, join=writer.maddrs[:1])
    assert find_config(reader) == nxt
