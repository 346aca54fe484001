"""Local training: full and LoRA rounds make valid deltas, checkpoints resume, devices."""

from __future__ import annotations

import json

import pytest
import torch

from node.config import TrainOptions
from node.training.data import load_dataset
from node.training.tiny_model import CORPUS, build_tokenizer
from node.training.trainer import Trainer, TrainError, pick_device
from protocol.container import DeltaReader
from protocol.delta import TensorMap, create_delta


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.txt"
    path.write_text("\n\n".join(CORPUS * 4))
    return load_dataset([path], build_tokenizer(), seq_len=32)


OPTS = {"seq_len": 32, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_blocks": 4}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_round_lowers_the_loss_and_makes_a_valid_delta(
    tiny_base, dataset, tmp_path, identity, lora
):
    trainer = Trainer(tiny_base, dataset, TrainOptions(lora=lora, **OPTS))
    before = trainer.evaluate()
    stats = trainer.train_round(max_steps=8, max_seconds=None)
    assert stats.steps == 8 and stats.samples == 32 and stats.stopped == "budget"
    assert trainer.evaluate() < before
    weights = trainer.trained_weights()
    delta_id, header = create_delta(
        tiny_base, TensorMap(weights), tmp_path / "d.msd", identity=identity, drop_rate=0.5
    )
    with DeltaReader(tmp_path / "d.msd") as reader:
        assert reader.id == delta_id and reader.header.params == header.params
    if lora:  # only the adapted projections moved; training can go on after the merge
        moved = {n for n, t in weights.items() if not torch.equal(t, _base_tensor(tiny_base, n))}
        assert moved and all(n.rsplit(".", 2)[-2] in OPTS_LORA_TARGETS for n in moved)
        assert trainer.train_round(max_steps=1, max_seconds=None).steps == 1


OPTS_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj"}


def _base_tensor(model_dir, name):
    from protocol.model_dir import ModelDir

    return ModelDir(model_dir).tensor(name)


def test_a_checkpoint_restores_weights_optimizer_step_and_data_position(
    tiny_base, dataset, tmp_path
):
    a = Trainer(tiny_base, dataset, TrainOptions(**OPTS))
    a.train_round(max_steps=3, max_seconds=None)
    a.save(tmp_path / "ckpt", {"base_id": "x"})
    a.train_round(max_steps=2, max_seconds=None)
    b = Trainer(tiny_base, dataset, TrainOptions(**OPTS))
    extra = b.load(Trainer.latest(tmp_path / "ckpt"))
    assert extra["base_id"] == "x" and (b.step, b.position) == (3, 12)
    b.train_round(max_steps=2, max_seconds=None)
    for name, p in a.params.items():  # the same two steps from the same state
        torch.testing.assert_close(b.params[name], p)


def test_on_a_new_base_a_checkpoint_gives_its_optimizer_state_but_not_its_weights(
    tiny_base, tiny_finetuned, dataset, tmp_path
):
    a = Trainer(tiny_base, dataset, TrainOptions(**OPTS))
    a.train_round(max_steps=3, max_seconds=None)
    a.save(tmp_path / "ckpt", {"base_id": "old"})
    b = Trainer(tiny_finetuned, dataset, TrainOptions(**OPTS))  # the next head
    before = {n: p.detach().clone() for n, p in b.params.items()}
    b.load(Trainer.latest(tmp_path / "ckpt"), weights=False)
    assert (b.step, b.position) == (3, 12)
    for name, p in b.params.items():
        torch.testing.assert_close(p, before[name])  # the new base's weights stay
        torch.testing.assert_close(
            b.optimizer.state[p]["exp_avg"], a.optimizer.state[a.params[name]]["exp_avg"]
        )


def test_a_round_stops_when_asked(tiny_base, dataset):
    trainer = Trainer(tiny_base, dataset, TrainOptions(**OPTS))
    calls = iter([False, False, True])
    stats = trainer.train_round(max_steps=100, max_seconds=None, should_stop=lambda: next(calls))
    assert stats.steps == 2 and stats.stopped == "interrupted"
    with pytest.raises(TrainError, match="budget"):
        trainer.train_round(max_steps=None, max_seconds=None)


def test_warmup_then_cosine_decay_to_a_tenth():
    t = Trainer.__new__(Trainer)
    t.options = TrainOptions(lr=1.0, warmup_steps=4, decay_steps=100)
    assert t.lr_at(0) == pytest.approx(0.25) and t.lr_at(3) == pytest.approx(1.0, rel=1e-2)
    assert t.lr_at(100) == pytest.approx(0.1) and t.lr_at(500) == pytest.approx(0.1)


def test_cuda_is_refused_cleanly_without_a_gpu_and_auto_falls_back():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be shown here")
    with pytest.raises(TrainError, match="no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto") == (torch.device("cpu"), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_cuda_path_trains_with_autocast(tiny_base, dataset):
    trainer = Trainer(tiny_base, dataset, TrainOptions(device="cuda", **OPTS))
    assert trainer.device.type == "cuda"
    assert trainer.train_round(max_steps=2, max_seconds=None).steps == 2


def test_a_base_that_is_not_a_model_is_a_clear_error(tmp_path, dataset):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TrainError, match="cannot load the base"):
        Trainer(tmp_path, dataset, TrainOptions(**OPTS))


def test_a_checkpoint_of_a_nodes_settings_with_paths_saves(tiny_base, dataset, tmp_path):
    from pathlib import Path

    from node.config import NodeSettings

    settings = NodeSettings(**OPTS, swarm_config=Path("swarm.toml"), data=["d.jsonl"])
    trainer = Trainer(tiny_base, dataset, settings)
    trainer.train_round(max_steps=1, max_seconds=None)
    trainer.save(tmp_path / "ckpt", {})
    saved = json.loads((Trainer.latest(tmp_path / "ckpt") / "state.json").read_text())
    assert saved["options"]["swarm_config"] == "swarm.toml"
