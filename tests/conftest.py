"""Session fixtures: tiny models built from a config (nothing is downloaded)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import torch

from node.training.finetune import quick_finetune
from node.training.tiny_model import CORPUS, build_tiny_model
from protocol.identity import Identity


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """MERGESWARM_TEST_NAMES=FILE keeps only the tests whose function names FILE lists (one a
    line, # for comments): how an older commit's suite is timed on today's code (README)."""
    names_file = os.environ.get("MERGESWARM_TEST_NAMES")
    if not names_file:
        return
    lines = Path(names_file).read_text().splitlines()
    names = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    kept = [item for item in items if item.originalname in names]  # type: ignore[attr-defined]
    dropped = [item for item in items if item.originalname not in names]  # type: ignore[attr-defined]
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "finetuned"
    quick_finetune(tiny_base, out, CORPUS, steps=5)
    return out


@pytest.fixture(scope="session")
def finetunes(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three short fine-tunes of ``tiny_base``, each on its own third of the corpus."""
    root = tmp_path_factory.mktemp("finetunes")
    return [
        quick_finetune(tiny_base, root / f"ft{i}", CORPUS[i::3], steps=3, seed=i).out_dir
        for i in range(3)
    ]


@pytest.fixture(scope="session")
def tiny_base_bf16_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture in bf16, split into several safetensors shards."""
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "base-bf16",
        seed=3,
        dtype=torch.bfloat16,
        max_shard_size="40KB",
    )


@pytest.fixture(scope="session")
def identity() -> Identity:
    return Identity.generate()


@pytest.fixture(autouse=True)
def one_heavy_test_at_a_time(request: pytest.FixtureRequest, tmp_path_factory):
    """Tests marked ``heavy`` (they train or run a swarm flat out, or count copies or
    seconds that a loaded machine skews) never run beside one another on xdist workers
    (MERGESWARM_TEST_WORKERS=2 bash scripts/test.sh): each holds a lock file the workers
    share (their temp dirs' parent).
    The soak next to the six-peer exchange had the origin send 2.00 copies, not under 2."""
    if request.node.get_closest_marker("heavy") is None:
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "heavy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session", autouse=True)
def zygote():
    """Stop the zygote (tests/zygote.py) that the session's daemons forked from, if any."""
    yield
    from tests.swarm import close_zygote

    close_zygote()


@pytest.fixture(autouse=True)
def reap_peers():
    """Kill every daemon a test started (and its p2pd), even when the test failed."""
    from tests.swarm import reap_all

    yield
    reap_all()


@pytest.fixture
def local_peer(tmp_path: Path):
    """Make in-process swarm peers (real DHT and p2pd on loopback), shut down afterwards."""
    from node.config import SwarmOptions
    from node.net.swarm import Swarm
    from tests.swarm import LOOPBACK

    made = []

    def make(name: str, **options) -> Swarm:
        made.append(Swarm(SwarmOptions(tmp_path / name, host_maddrs=[LOOPBACK], **options)))
        return made[-1]

    yield make
    for peer in reversed(made):
        peer.shutdown()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run ``mergeswarm`` in this process: (exit code, stdout lines, stderr lines)."""
    from node.cli import main

    monkeypatch.setenv("HIVEMIND_LOGLEVEL", "WARNING")  # main() sets it; keep it to this test

    def run(*args: object) -> tuple[int, list[str], list[str]]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out.splitlines(), [ln for ln in err.splitlines() if ln.strip()]

    return run
