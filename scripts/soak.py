"""Soak: a local swarm that runs for a long time under chaos, and what it kept.

One swarm on 127.0.0.1 of N volunteers (the tiny model), 2 aggregators and 2 seeds, each a
real daemon process, for T minutes. On a schedule printed at the start it kills a random
daemon with SIGKILL and restarts it on the same data dir (and port), freezes one with
SIGSTOP for a minute, and restarts a seed. Every --sample-every seconds it samples each
daemon's process tree (RSS, open fds, threads, child processes) and reads the swarm through
``mergeswarm status --json``; a peer of its own follows the heads and the leases all along.

At the end, a table (and with --json, the same figures):
- rounds completed; time between heads (p50, p95, max); stuck rounds (no new head for more
  than three round periods);
- every delta a volunteer announced (from its log), and what became of it: merged (a head
  names it); rejected or unavailable (the aggregators' logs say so); superseded (announced
  after the aggregator read the round's announcements, and a round later its author's
  fresher delta took the author's one slot); late (the same, the next round not yet made);
  pending (on the last head when the run stopped); or unaccounted for (the target is 0;
  their ids are listed);
- RSS growth per role over the last two thirds of the run (target under 10%), fd and
  thread growth, measured on daemons that ran through that stretch unrestarted: the median
  of the samples in the sixth after the first third against that of the last sixth (with
  --json, every sample as well, under "series");
- processes left behind after the swarm stops (target 0).

    .venv/bin/python scripts/soak.py --volunteers 16 --minutes 30 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.daemon.launch import (  # noqa: E402
    SHARED_CORES_ENV,
    PeerProcess,
    PeerStartError,
    kill_group,
    launch_peer,
)
from node.demo.lab import log_records  # noqa: E402
from node.demo.local_swarm import (  # noqa: E402
    DEMO_MODELS,
    author_of,
    prepare_swarm,
    volunteer_flags,
)
from protocol.swarm_config import load_swarm_config  # noqa: E402

ROLES = ("volunteer", "aggregator", "seed")
STOP_SECONDS = 60.0  # how long a SIGSTOPped daemon stays frozen
RESTART_AFTER = 5.0  # seconds between a SIGKILL and the restart
RSS_TARGET = 10.0  # percent over the last two thirds
GROWTH_FIGURES = ("rss", "own_rss", "peak_rss", "fds", "threads", "own_threads")
SERIES_FIELDS = ("rss_mb", "own_rss_mb", "fds", "threads", "own_threads")


@dataclass
class Daemon:
    """One daemon of the soak: how to start it, and its current process."""

    name: str
    role: str
    argv: list[str]
    data_dir: Path
    log: Path
    maddr: str
    proc: PeerProcess | None = None
    starts: list[float] = field(default_factory=list)  # when it was (re)started, soak time

    def start(self, now: float, env: dict[str, str]) -> None:
        for attempt in range(3):  # the port of a killed predecessor may linger a moment
            try:
                self.proc = launch_peer(self.name, self.argv, data_dir=self.data_dir,
                                        log=self.log, env=env)  # fmt: skip
                break
            except PeerStartError:
                if attempt == 2:
                    raise
                time.sleep(3)
        self.starts.append(now)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None


@dataclass
class Sample:
    t: float
    per_daemon: dict[str, dict[str, float]]  # name -> rss_mb, fds, threads, children
    status: dict | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_stats(pid: int) -> dict[str, float]:
    """RSS (MB), open fds, threads and child processes of a process and its descendants, and
    the RSS and threads of the process alone (``own_``: the Python daemon, without its p2pd
    and DHT processes, to tell whose growth it is)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        own = {"own_rss_mb": root.memory_info().rss / 2**20, "own_threads": root.num_threads()}
    except psutil.NoSuchProcess:
        return {}
    rss = fds = threads = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.NoSuchProcess:
            continue
    tree = {"rss_mb": rss / 2**20, "fds": fds, "threads": threads, "children": len(procs) - 1}
    return tree | own


def growth(samples: list[Sample], daemons: dict[str, Daemon]) -> dict:
    """Per role: median RSS growth (%) and fd/thread growth from the window after a third
    of the run to the window at its end, over daemons not restarted in between.

    Each figure is the median of a window's samples (a sixth of the run each), not one
    sample: an aggregator's memory and threads swing with its round (sixteen fetches and
    a merge under way, then idle), and two single samples taken at different points of
    that swing read as growth or shrinkage that is not there. A leak moves the median;
    ``rss_peak_growth_pct_max`` compares the windows' highest samples as well.
    """
    if len(samples) < 3:
        return {}
    end = samples[-1].t
    start = next(s.t for s in samples if s.t >= end / 3)
    width = (end - start) / 4
    early = [s for s in samples if start <= s.t <= start + width]
    late = [s for s in samples if s.t >= end - width]
    out = {}
    for role in ROLES:
        rows: dict[str, list[float]] = {k: [] for k in GROWTH_FIGURES}
        for name, d in daemons.items():
            if d.role != role or any(start - 30 <= t <= end for t in d.starts[1:]):
                continue
            a = [s.per_daemon[name] for s in early if s.per_daemon.get(name)]
            b = [s.per_daemon[name] for s in late if s.per_daemon.get(name)]
            if not (a and b):
                continue
            rows["rss"].append(_pct(_median(a, "rss_mb"), _median(b, "rss_mb")))
            rows["own_rss"].append(_pct(_median(a, "own_rss_mb"), _median(b, "own_rss_mb")))
            peaks = [max(x["rss_mb"] for x in window) for window in (a, b)]
            rows["peak_rss"].append(_pct(*peaks))
            for key in ("fds", "threads", "own_threads"):
                rows[key].append(_median(b, key) - _median(a, key))
        if rows["rss"]:
            out[role] = {
                "daemons": len(rows["rss"]),
                "rss_growth_pct": round(statistics.median(rows["rss"]), 2),
                "rss_growth_pct_max": round(max(rows["rss"]), 2),
                "rss_peak_growth_pct_max": round(max(rows["peak_rss"]), 2),
                "own_rss_growth_pct_max": round(max(rows["own_rss"]), 2),
                "fd_growth_max": max(rows["fds"]),
                "thread_growth_max": max(rows["threads"]),
                "own_thread_growth_max": max(rows["own_threads"]),
            }
    return out


def _median(window: list[dict[str, float]], key: str) -> float:
    return statistics.median(x[key] for x in window)


def _pct(before: float, after: float) -> float:
    return 100 * (after - before) / before


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.daemons: dict[str, Daemon] = {}
        self.samples: list[Sample] = []
        self.heads: dict[str, tuple[float, object]] = {}  # base id -> (first seen, Head)
        self.events: list[dict] = []
        self.frozen: dict[str, float] = {}  # name -> when to SIGCONT
        self.status_thread: threading.Thread | None = None
        self.env = os.environ | SHARED_CORES_ENV | {"MERGESWARM_LOG_FORMAT": "json"}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self.now():7.1f} s] {text}", flush=True)

    # -- set-up --------------------------------------------------------------------------

    def prepare(self) -> None:
        a = self.args
        model = DEMO_MODELS["tiny"]
        setup = prepare_swarm(
            self.workdir, model=model, volunteers=min(a.volunteers, 4),
            pretrain_steps=a.pretrain_steps, round_period=a.round_period,
            rules=("--min-deltas", str(max(1, a.volunteers // 4)),
                   "--max-deltas", str(min(32, a.volunteers)), "--staleness", "1"),
            log=lambda text: self.log(text),
        )  # fmt: skip
        self.swarm_id = load_swarm_config(setup.config).swarm_id
        ports = {}
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)

        def daemon(name: str, role: str, args: list[str], data_dir: Path) -> Daemon:
            ports[name] = free_port()
            argv = [sys.executable, "-m", "node.cli", *args, "--data-dir", str(data_dir)]
            argv += ["--host-maddr", f"/ip4/127.0.0.1/tcp/{ports[name]}"]
            argv += ["--heartbeat-every", "5"]
            d = Daemon(name, role, argv, data_dir, logs / f"{name}.log", "")
            self.daemons[name] = d
            return d

        agg = ["aggregator", "--config", str(setup.config), "--genesis", str(setup.genesis)]
        agg += ["--lease-seconds", "20"]
        first = daemon("aggregator-1", "aggregator", agg, setup.aggregators[0])
        first.start(self.now(), self.env)
        first.maddr = first.proc.maddrs[0]
        # every later daemon joins through the first aggregator and, once they are up, the
        # seeds: after a restart on the same port and key their addresses still hold
        join = ["--join", first.maddr]  # aggregators take the swarm id from the config
        daemon("aggregator-2", "aggregator", [*agg, *join], setup.aggregators[1])
        for i in (1, 2):
            args = ["seed", *join, "--swarm-id", self.swarm_id]
            daemon(f"seed-{i}", "seed", args, self.workdir / f"seed-{i}")
        self._start_all([d for d in self.daemons.values() if d.proc is None])
        joins = [d.maddr for d in self.daemons.values() if d.role != "volunteer"]
        join = [x for m in joins for x in ("--join", m)] + ["--swarm-id", self.swarm_id]
        train = ["--round-steps", str(a.round_steps), *volunteer_flags(model.train)]
        train += ["--rounds-per-head", "1"]
        domains = list(setup.data.values())
        for i in range(a.volunteers):
            data = domains[i % len(domains)]
            args = ["node", *join, "--data", str(data), *train]
            daemon(f"volunteer-{i + 1}", "volunteer", args, self.workdir / f"volunteer-{i + 1}")
        self._start_all([d for d in self.daemons.values() if d.proc is None])
        self.joins = joins
        self.trusted = {author_of(d) for d in setup.aggregators}

    def _start_all(self, daemons: list[Daemon]) -> None:
        threads = [threading.Thread(target=d.start, args=(self.now(), self.env)) for d in daemons]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for d in daemons:
            if d.proc is None:
                raise RuntimeError(f"{d.name} did not start; see {d.log}")
            d.maddr = d.proc.maddrs[0]
        self.log(f"started {', '.join(d.name for d in daemons)}")

    # -- chaos ---------------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        kinds = ["kill9", "stop", "kill9", "restart_seed"]
        every, end = self.args.chaos_every, self.args.minutes * 60
        times = [every * k for k in range(1, int(end // every) + 1) if every * k < end - 30]
        return [(t, kinds[i % len(kinds)]) for i, t in enumerate(times)]

    def chaos(self, kind: str) -> None:
        names = sorted(self.daemons)
        if kind == "kill9":
            pool = [n for n in names if self.daemons[n].role != "seed" and n not in self.frozen]
        elif kind == "stop":
            pool = [n for n in names if n not in self.frozen]
        else:
            pool = [n for n in names if self.daemons[n].role == "seed"]
        name = self.rng.choice(pool)
        d = self.daemons[name]
        event = {"t": round(self.now(), 1), "kind": kind, "daemon": name}
        self.events.append(event)
        self.log(f"chaos: {kind} {name}")
        if kind == "kill9":
            d.proc.kill9()
            time.sleep(RESTART_AFTER)
            d.start(self.now(), self.env)
        elif kind == "stop":
            kill_group(d.proc.proc, signal.SIGSTOP)
            self.frozen[name] = self.now() + STOP_SECONDS
        else:
            started = time.monotonic()
            try:
                d.proc.stop(timeout=30)  # SIGKILLed (with its p2pd) if it takes longer
            except subprocess.TimeoutExpired:
                self.log(f"{name} did not stop within 30 s of SIGTERM: killed")
                event["killed"] = True
                d.proc.proc.wait(timeout=10)
            event["stop_seconds"] = round(time.monotonic() - started, 1)
            d.start(self.now(), self.env)

    def thaw(self) -> None:
        for name, until in list(self.frozen.items()):
            if self.now() >= until:
                kill_group(self.daemons[name].proc.proc, signal.SIGCONT)
                del self.frozen[name]
                self.log(f"chaos: SIGCONT {name}")

    # -- watching --------------------------------------------------------------------------

    def watch(self, observer) -> None:
        from node.chain.history import current_head

        head = current_head(observer, self.trusted)
        if head is not None and head.base_id not in self.heads:
            self.heads[head.base_id] = (self.now(), head)
            self.log(f"head: round {head.round}, {head.deltas} deltas")

    def sample(self) -> None:
        """Sample every daemon's process tree now, and read ``mergeswarm status --json`` on
        the side (a loaded machine takes a minute to start a peer: the watch goes on)."""
        per = {}
        for name, d in self.daemons.items():
            if d.alive():
                per[name] = tree_stats(d.proc.proc.pid)
        sample = Sample(self.now(), per, None)
        self.samples.append(sample)
        self.log(f"sample: {len(per)} daemons up")
        if self.status_thread is None or not self.status_thread.is_alive():
            self.status_thread = threading.Thread(target=self._status, args=(sample,))
            self.status_thread.start()

    def _status(self, sample: Sample) -> None:
        cmd = [sys.executable, "-m", "node.cli", "status", "--json", "--wait", "2"]
        cmd += [x for m in self.joins for x in ("--join", m)]
        cmd += ["--host-maddr", "/ip4/127.0.0.1/tcp/0"]
        started = self.now()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env)
            sample.status = json.loads(out.stdout) if out.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            sample.status = None
        if sample.status is None:
            self.log("status: no answer")
            return
        head = sample.status.get("head") or {}
        self.log(f"status (asked at {started:.0f} s): round {head.get('round')}, "
                 f"{len(sample.status.get('peers', []))} peers heart-beating")  # fmt: skip

    def run(self) -> None:
        from node.config import SwarmOptions
        from node.net.swarm import Swarm

        plan = self.schedule()
        self.log("chaos schedule: " + ", ".join(f"{t:.0f} s {k}" for t, k in plan))
        observer = Swarm(
            SwarmOptions(self.workdir / "observer", join=self.joins,
                         host_maddrs=["/ip4/127.0.0.1/tcp/0"], swarm_id=self.swarm_id)
        )  # fmt: skip
        start = self.now()  # the schedule and the duration count from here, set-up done
        plan = [(start + t, kind) for t, kind in plan]
        end = start + self.args.minutes * 60
        next_sample = 0.0
        try:
            while self.now() < end:
                if plan and self.now() >= plan[0][0]:
                    self.chaos(plan.pop(0)[1])
                self.thaw()
                try:
                    self.watch(observer)
                except Exception as exc:  # noqa: BLE001 - the watch must outlive a bad read
                    self.log(f"observer: {exc}")
                if self.now() >= next_sample:
                    self.sample()
                    next_sample = self.now() + self.args.sample_every
                time.sleep(2.0)
            self.chain = self._walk(observer)
        finally:
            observer.shutdown()
            if self.status_thread is not None:
                self.status_thread.join()

    def _walk(self, observer) -> dict[str, object]:
        """Every head back to the genesis: rounds the watch missed are filled in from the
        records of the bases (each head's parent)."""
        from node.chain.history import base_record

        chain = {b: h for b, (_, h) in self.heads.items()}
        todo = list(chain.values())
        while todo:
            head = todo.pop()
            if head.parent and head.parent not in chain:
                parent = base_record(observer, head.parent, self.trusted)
                if parent is not None:
                    chain[parent.base_id] = parent
                    todo.append(parent)
        return chain

    def stop(self) -> int:
        for name in list(self.frozen):
            kill_group(self.daemons[name].proc.proc, signal.SIGCONT)
        self.stops = {}  # name -> seconds SIGTERM took (None: it had to be killed)
        up = [d for d in self.daemons.values() if d.alive()]
        started = time.monotonic()
        for d in up:  # all at once, as a machine shutting down does
            d.proc.proc.send_signal(signal.SIGTERM)
        for d in up:
            try:
                d.proc.proc.wait(timeout=max(0.1, started + 30 - time.monotonic()))
                self.stops[d.name] = round(time.monotonic() - started, 1)
            except subprocess.TimeoutExpired:
                self.stops[d.name] = None
                self.log(f"{d.name} did not stop within 30 s of SIGTERM: killed")
                kill_group(d.proc.proc, signal.SIGKILL)
                d.proc.proc.wait(timeout=10)
        time.sleep(2)
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        left = [
            p for p in psutil.process_iter(["pid", "cmdline"])
            if p.pid not in mine and str(self.workdir) in " ".join(p.info["cmdline"] or ())
        ]  # fmt: skip
        for p in left:
            print(f"left behind: pid {p.pid} {' '.join(p.info['cmdline'] or ())[:200]}")
            p.kill()
        return len(left)

    # -- figures -----------------------------------------------------------------------------

    def deltas(self) -> dict:
        """What became of every delta a volunteer announced (its log says which and when)."""
        published: dict[str, tuple[float, str, str]] = {}  # id -> (wall time, base, volunteer)
        for d in self.daemons.values():
            if d.role == "volunteer" and d.log.is_file():
                for e in log_records(d.log, "round"):
                    if "delta_id" in e and "announced" in e.get("msg", ""):
                        published.setdefault(e["delta_id"], (e["ts"], e["base_id"], d.name))
        rejected, unavailable, leased = set(), set(), {}
        for d in self.daemons.values():
            if d.role == "aggregator" and d.log.is_file():
                rejected |= {e["msg"].split()[2] for e in log_records(d.log, "rejected delta")}
                unavailable |= {e["msg"].split()[1] for e in log_records(d.log, "delta ")
                                if "unavailable" in e["msg"]}  # fmt: skip
                for e in log_records(d.log, "holding the lease of round"):
                    read_at = e.get("announcements_read_at", e["ts"])
                    leased[e["round"]] = min(leased.get(e["round"], read_at), read_at)
        chain = self.chain
        merged = {x for h in chain.values() for x in h.merged}
        children = {h.parent: h for h in chain.values() if h.parent}
        last = max(chain.values(), key=lambda h: h.round).base_id if chain else None
        newest = {}  # volunteer -> the time of its newest delta
        for ts, _, who in published.values():
            newest[who] = max(newest.get(who, ts), ts)
        fates = ("merged", "rejected", "late", "superseded", "pending", "unavailable")
        fate: dict[str, list[str]] = {k: [] for k in (*fates, "unaccounted")}
        for delta, (ts, base, who) in published.items():
            child = children.get(base)
            if delta in merged:
                kind = "merged"
            elif delta[:16] in rejected:
                kind = "rejected"
            elif delta[:16] in unavailable:  # the aggregator says so (its author died, say)
                kind = "unavailable"
            elif base == last or base not in chain:
                kind = "pending"  # its round had not come when the soak stopped
            elif child is not None and ts >= leased.get(child.round, child.created or 0):
                # announced after the aggregator read the round's announcements: the next
                # round takes it as a stale delta (staleness 1), unless its author's fresher
                # delta takes the author's one slot
                if newest[who] > ts:
                    kind = "superseded"
                elif children.get(child.base_id) is None:
                    kind = "late"  # the next round had not come
                else:
                    kind = "unaccounted"
            else:
                kind = "unaccounted"
            fate[kind].append(delta)
        counts = {k: len(v) for k, v in fate.items()}
        return {"published": len(published)} | counts | {"unaccounted_ids": fate["unaccounted"]}

    def growth(self) -> dict:
        return growth(self.samples, self.daemons)

    def series(self) -> dict[str, list[list[float]]]:
        """Every sample of every daemon: [t, rss_mb, own_rss_mb, fds, threads, own_threads]."""
        out: dict[str, list[list[float]]] = {}
        for s in self.samples:
            for name, x in s.per_daemon.items():
                if x:
                    row = [s.t, *(x[k] for k in SERIES_FIELDS)]
                    out.setdefault(name, []).append([round(v, 1) for v in row])
        return out

    def report(self, left_behind: int) -> dict:
        chain = self.chain
        made = sorted(h.created for h in chain.values() if h.created is not None)
        gaps = [b - a for a, b in zip(made, made[1:], strict=False)]
        period = self.args.round_period
        rounds = max((h.round for h in chain.values()), default=0)
        return {
            "volunteers": self.args.volunteers,
            "minutes": self.args.minutes,
            "round_period": period,
            "rounds": rounds,
            "head_interval_seconds": {
                "p50": round(statistics.median(gaps), 1) if gaps else None,
                "p95": round(_quantile(gaps, 0.95), 1) if gaps else None,
                "max": round(max(gaps), 1) if gaps else None,
            },
            "stuck_rounds": sum(g > 3 * max(period, _cycle(gaps)) for g in gaps),
            "deltas": self.deltas(),
            "unaccounted_deltas": 0,  # filled below
            "growth": self.growth(),
            "status_answered": sum(x.status is not None for x in self.samples),
            "samples": len(self.samples),
            "series": self.series(),
            "processes_left_behind": left_behind,
            "stop_seconds_max": max((v for v in self.stops.values() if v is not None), default=0),
            "killed_at_stop": sorted(n for n, v in self.stops.items() if v is None),
            "chaos": self.events,
        }


def _cycle(gaps: list[float]) -> float:
    """The swarm's usual time between heads: the median gap (training takes longer than the
    round period when many volunteers share two cores)."""
    return statistics.median(gaps) if gaps else 0.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(r: dict) -> None:
    d, h = r["deltas"], r["head_interval_seconds"]
    print(f"\nsoak: {r['volunteers']} volunteers, 2 aggregators, 2 seeds, {r['minutes']} min, "
          f"round period {r['round_period']:g} s, {len(r['chaos'])} chaos events")  # fmt: skip
    print(f"rounds completed            {r['rounds']}")
    print(f"time between heads          p50 {h['p50']} s, p95 {h['p95']} s, max {h['max']} s")
    print(f"stuck rounds                {r['stuck_rounds']}")
    print(f"deltas published            {d['published']}")
    for k in ("merged", "rejected", "late", "superseded", "pending", "unavailable"):
        print(f"  {k:<26}{d[k]}")
    print(f"  unaccounted for           {d['unaccounted']}   (target 0)")
    for role, g in r["growth"].items():
        ok = "ok" if g["rss_growth_pct"] < RSS_TARGET else "OVER"
        print(f"{role + ' RSS growth':<28}{g['rss_growth_pct']:+.1f}% median, "
              f"{g['rss_growth_pct_max']:+.1f}% max over {g['daemons']} daemons ({ok}); "
              f"peaks {g['rss_peak_growth_pct_max']:+.1f}% at most; "
              f"fds {g['fd_growth_max']:+g}, threads {g['thread_growth_max']:+g} at most; "
              f"the Python process alone {g['own_rss_growth_pct_max']:+.1f}%, "
              f"threads {g['own_thread_growth_max']:+g}")  # fmt: skip
    print(f"status --json answered      {r['status_answered']} of {r['samples']} samples")
    print(f"processes left behind       {r['processes_left_behind']}   (target 0)")
    killed = ", ".join(r["killed_at_stop"]) or "none"
    print(
        f"SIGTERM to stopped          {r['stop_seconds_max']} s at most; killed after 30 s: {killed}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--volunteers", type=int, default=16)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    p.add_argument("--chaos-every", type=float, default=180, help="seconds between events")
    p.add_argument("--sample-every", type=float, default=30)
    p.add_argument("--round-period", type=float, default=20)
    p.add_argument("--round-steps", type=int, default=10, help="volunteer steps per head")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="of the chaos schedule")
    args = p.parse_args()
    if args.volunteers < 1 or args.minutes <= 0:
        p.error("--volunteers and --minutes must be positive")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-soak-"))
    soak = Soak(args, workdir)
    print(f"soak in {workdir}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    left = 0
    try:
        soak.prepare()
        soak.run()
    finally:
        left = soak.stop()
    report = soak.report(left)
    report["unaccounted_deltas"] = report["deltas"]["unaccounted"]
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
