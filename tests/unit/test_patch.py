"""Base patches and snapshots: bit-exact round trips, hostile files refused."""

from __future__ import annotations

import struct

import pytest

from protocol.errors import BaseMismatchError, DeltaFormatError
from protocol.ids import base_id
from protocol.model_dir import ModelDir, carried_files
from protocol.patch import PatchError, PatchReader, apply_patch, write_patch


def test_a_patch_rebuilds_the_child_bit_for_bit(tiny_base, tiny_finetuned, tmp_path):
    child_id = write_patch(ModelDir(tiny_finetuned), tmp_path / "p.msp", ModelDir(tiny_base))
    assert child_id == base_id(tiny_finetuned)
    assert apply_patch(tmp_path / "p.msp", tmp_path / "child", ModelDir(tiny_base)) == child_id
    assert base_id(tmp_path / "child") == child_id
    assert carried_files(tmp_path / "child") == carried_files(tiny_finetuned)


def test_a_patch_between_equal_bases_is_tiny(tiny_base, tmp_path):
    write_patch(ModelDir(tiny_base), tmp_path / "p.msp", ModelDir(tiny_base))
    reader = PatchReader(tmp_path / "p.msp")
    assert all(t.frame_size == 0 for t in reader.header.tensors) and not reader.header.files
    header_bytes = len(reader.header.model_dump_json())
    assert (tmp_path / "p.msp").stat().st_size == 16 + header_bytes  # no frames at all


def test_a_snapshot_needs_no_parent(tiny_base_bf16_sharded, tmp_path):
    child_id = write_patch(ModelDir(tiny_base_bf16_sharded), tmp_path / "s.msp")
    assert apply_patch(tmp_path / "s.msp", tmp_path / "out") == child_id
    assert base_id(tmp_path / "out") == base_id(tiny_base_bf16_sharded)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_patch_for_another_parent_is_refused(tiny_base, tiny_finetuned, tmp_path):
    write_patch(ModelDir(tiny_finetuned), tmp_path / "p.msp", ModelDir(tiny_base))
    with pytest.raises(BaseMismatchError, match="made for parent"):
        apply_patch(tmp_path / "p.msp", tmp_path / "out", ModelDir(tiny_finetuned))
    with pytest.raises(PatchError, match="needs its parent"):
        apply_patch(tmp_path / "p.msp", tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_flipped_bit_in_a_frame_is_caught_and_nothing_is_written(tiny_base, tmp_path):
    write_patch(ModelDir(tiny_base), tmp_path / "s.msp")
    data = bytearray((tmp_path / "s.msp").read_bytes())
    data[-200] ^= 0x10  # inside the last frames
    (tmp_path / "bad.msp").write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError):  # a corrupt frame, or a result with another id
        apply_patch(tmp_path / "bad.msp", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: b"NOTPATCH" + d[8:], "bad magic"),
        (lambda d: d[:8] + struct.pack("<H", 9) + d[10:], "version 9"),
        (lambda d: d[:12] + struct.pack("<I", 1 << 30) + d[16:], "does not fit"),
        (lambda d: d[:-1], "do not add up"),
        (lambda d: d[:10], "too short"),
    ],
)
def test_malformed_patches_are_refused_before_reading_frames(tiny_base, tmp_path, mangle, message):
    write_patch(ModelDir(tiny_base), tmp_path / "s.msp")
    (tmp_path / "bad.msp").write_bytes(mangle((tmp_path / "s.msp").read_bytes()))
    with pytest.raises(PatchError, match=message):
        PatchReader(tmp_path / "bad.msp")
