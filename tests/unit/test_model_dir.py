"""Model directories: base ids, streaming reads and writes that transformers loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from protocol.errors import ModelDirError
from protocol.ids import base_id
from protocol.model_dir import INDEX_FILE, ModelDir, plan_shards, write_model_dir


def test_base_id_ignores_sharding_and_file_order(tiny_base, tmp_path):
    tensors = load_file(tiny_base / "model.safetensors")
    names = sorted(tensors)
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    halves = {"s2.safetensors": names[::2], "s1.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file(
            {n: tensors[n] for n in reversed(part)}, resharded / fname, metadata={"format": "pt"}
        )
    weight_map = {n: f for f, part in halves.items() for n in part}
    (resharded / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert base_id(resharded) == base_id(tiny_base)


def test_base_id_changes_with_any_byte_name_dtype_or_shape(tiny_base, tmp_path):
    tensors = load_file(tiny_base / "model.safetensors")
    reference = base_id(tiny_base)
    name = sorted(tensors)[0]

    def variant(label, mutate):
        d = tmp_path / label
        d.mkdir()
        t = dict(tensors)
        mutate(t)
        save_file(t, d / "model.safetensors")
        return base_id(d)

    def flip_one_bit(t):
        t[name] = t[name].clone()
        t[name].view(-1).view(torch.int32)[0] ^= 1

    def rename(t):
        t[name + "x"] = t.pop(name)

    def to_f16(t):
        t[name] = t[name].to(torch.float16)

    def reshape(t):
        t[name] = t[name].reshape(-1)

    ids = {
        variant(label, fn)
        for label, fn in [
            ("bit", flip_one_bit),
            ("name", rename),
            ("dtype", to_f16),
            ("shape", reshape),
        ]
    }
    assert len(ids) == 4 and reference not in ids


def test_base_id_follows_its_specification(tmp_path):
    d = tmp_path / "fixed"
    d.mkdir()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.ones(2, dtype=torch.bfloat16)
    save_file({"w": w, "b": b}, d / "model.safetensors")
    spec = hashlib.sha256(b"mergeswarm/base/v1\n")
    for name, dtype, t, raw in [
        ("b", b"BF16", b, b"\x80\x3f" * 2),
        ("w", b"F32", w, w.numpy().tobytes()),
    ]:
        spec.update(struct.pack("<I", 1) + name.encode() + bytes([len(dtype)]) + dtype)
        spec.update(
            struct.pack(f"<B{t.dim()}Q", t.dim(), *t.shape) + struct.pack("<Q", len(raw)) + raw
        )
    assert base_id(d) == spec.hexdigest()
    assert spec.hexdigest() == "32b82ccf6e1ad7536e804dd98617a8358b96106ddcccaddab1a631de3856a2f9"


def test_write_model_dir_streams_shards_and_carries_other_files(tiny_base_bf16_sharded, tmp_path):
    src = ModelDir(tiny_base_bf16_sharded)
    out = write_model_dir(
        tmp_path / "copy",
        src,
        ((n, src.tensor(n) * 2) for n in src.names()),
        max_shard_bytes=50_000,
    )
    copy = ModelDir(out)
    assert len({i.file for i in copy.tensors.values()}) > 2
    for name in src.names():
        assert torch.equal(copy.tensor(name), src.tensor(name) * 2)
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_write_model_dir_refuses_an_existing_output_and_wrong_tensors(tiny_base, tmp_path):
    src = ModelDir(tiny_base)
    with pytest.raises(ModelDirError, match="already exists"):
        write_model_dir(tmp_path, src, [])
    wrong = ((n, src.tensor(n).to(torch.float16)) for n in src.names())
    with pytest.raises(ModelDirError, match="expected"):
        write_model_dir(tmp_path / "out", src, wrong)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written directory left behind


def test_model_dir_errors_name_the_problem(tmp_path, tiny_base_bf16_sharded):
    with pytest.raises(ModelDirError, match="not a directory"):
        ModelDir(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="no model.safetensors"):
        ModelDir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_bf16_sharded, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ModelDirError, match=f"shard {victim.name} is missing"):
        ModelDir(broken)
    (broken / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ModelDirError, match="not a safetensors index"):
        ModelDir(broken)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelDirError, match="not a valid safetensors file"):
        ModelDir(garbage)


def test_plan_shards_respects_the_limit_and_keeps_order(tiny_base):
    infos = [ModelDir(tiny_base).tensors[n] for n in ModelDir(tiny_base).names()]
    shards = plan_shards(infos, 40_000)
    assert [i for s in shards for i in s] == infos
    assert all(sum(i.nbytes for i in s) <= 40_000 or len(s) == 1 for s in shards)


def test_an_index_with_non_string_entries_is_refused(tiny_base_bf16_sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_bf16_sharded, broken)
    (broken / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": 5}}))
    with pytest.raises(ModelDirError, match="not a safetensors index"):
        ModelDir(broken)
