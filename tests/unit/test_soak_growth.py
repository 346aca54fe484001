"""The soak's growth figures (scripts/soak.py): a daemon whose memory swings with its round
reads as flat, one that leaks reads as growing, and a restarted one is left out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def _soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _daemon(soak, name: str, role: str, starts: list[float]):
    return soak.Daemon(name, role, [], Path(name), Path(name + ".log"), "", starts=starts)


def _stats(rss: float, threads: int) -> dict[str, float]:
    return {"rss_mb": rss, "own_rss_mb": rss - 100, "fds": 40, "threads": threads,
            "own_threads": threads - 10, "children": 2}  # fmt: skip


def test_growth_compares_windows_so_a_round_caught_mid_merge_is_not_growth():
    soak = _soak()
    daemons = {
        "aggregator-1": _daemon(soak, "aggregator-1", "aggregator", [0.0]),
        "aggregator-2": _daemon(soak, "aggregator-2", "aggregator", [0.0, 1000.0]),
        "volunteer-1": _daemon(soak, "volunteer-1", "volunteer", [0.0]),
    }
    samples = []
    for i in range(61):  # 30 minutes, a sample every 30 s
        busy = i % 3 == 0  # every third sample lands inside a fetch and a merge
        samples.append(
            soak.Sample(
                t=30.0 * i,
                per_daemon={
                    "aggregator-1": _stats(340 if busy else 300, 36 if busy else 20),
                    "aggregator-2": _stats(300, 20),
                    "volunteer-1": _stats(300 * 1.004**i, 20),  # 0.4% a sample: a leak
                },
                status=None,
            )
        )
    assert samples[20].t == 600 and samples[60].t == 1800  # idle a third in, busy at the end
    point = 100 * (340 - 300) / 300
    assert point > soak.RSS_TARGET  # what comparing those two samples alone reported

    growth = soak.growth(samples, daemons)

    agg = growth["aggregator"]
    assert agg["daemons"] == 1  # aggregator-2 restarted inside the stretch
    assert agg["rss_growth_pct"] == 0.0 and agg["own_rss_growth_pct_max"] == 0.0
    assert agg["rss_peak_growth_pct_max"] == 0.0
    assert agg["thread_growth_max"] == 0 and agg["own_thread_growth_max"] == 0
    leak = growth["volunteer"]
    assert leak["rss_growth_pct"] > soak.RSS_TARGET  # 30 samples of 0.4%, window to window
    assert leak["rss_peak_growth_pct_max"] > soak.RSS_TARGET
