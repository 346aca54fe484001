"""``mergeswarm node``: run a volunteer — join, sync the head, train, publish deltas."""

from __future__ import annotations

import argparse
import logging

from node.data_dir import DataDir

from .daemon import add_daemon_args, add_data_dir_arg, load_daemon_settings, run_daemon

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from node.config import VolunteerSettings

    p = sub.add_parser(
        "node",
        help="run a volunteer: train on your data, publish deltas to the swarm",
        description="Join a swarm, fetch its head base, fine-tune it on your data round after "
        "round, and publish each round's DARE delta. Settings come from flags, then "
        "MERGESWARM_* environment variables, then --config FILE.toml, then defaults.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("status", "pause", "resume", "publish-now"),
        help="talk to the node already running with --data-dir instead of starting one: "
        "print its status (--json for scripts), pause or resume training, or end the "
        "current round now and publish its delta",
    )
    p.add_argument("--json", action="store_true", help="with `status`: print JSON")
    add_data_dir_arg(p, "identity, blobs, bases and checkpoints")
    add_daemon_args(p, VolunteerSettings)
    p.set_defaults(run=run_node)


def control(args: argparse.Namespace) -> int:
    """`mergeswarm node status|pause|resume|publish-now`: one call to the running node."""
    import json

    from node.volunteer.control import call

    method = {"status": "Status", "pause": "Pause", "resume": "Resume"}.get(
        args.action, "PublishNow"
    )
    reply = call(args.data_dir, method)
    if args.action != "status":
        print(reply.message)
        return 0
    if args.json:
        fields = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
        print(json.dumps(fields | {"announced": list(reply.announced)}))
        return 0
    head = (
        f"round {reply.head_round}, base {reply.head_id[:16]}"
        if reply.head_round >= 0
        else "none yet"
    )
    rows = [
        (
            "status",
            reply.status + (" (paused)" if reply.paused and reply.status != "paused" else ""),
        ),
        ("swarm", reply.swarm_id),
        ("peer", reply.peer_id),
        ("head", head),
        ("rounds done", str(reply.rounds_done)),
        ("samples/s", f"{reply.samples_per_second:.2f}"),
        ("deltas", ", ".join(d[:16] for d in reply.announced) or "-"),
    ]
    for key, value in rows:
        print(f"{key:<12} {value}")
    return 0


def run_node(args: argparse.Namespace) -> int:
    from node.config import VolunteerSettings
    from node.net.blobstore import BlobStore
    from node.settings import SettingsError
    from node.training.data import read_examples
    from node.volunteer.control import serve as serve_control
    from node.volunteer.volunteer import Volunteer
    from protocol.swarm_config import load_swarm_config

    if args.action is not None:
        return control(args)
    settings = load_daemon_settings(VolunteerSettings, args)
    if not settings.data:
        raise SettingsError("give your training data: --data FILE (JSONL or text; repeatable)")
    for path in settings.data:  # fail before joining, not minutes later
        read_examples(path)
    swarm_id = None
    if settings.swarm_config is not None:  # the config names the swarm to join
        swarm_id = load_swarm_config(settings.swarm_config).swarm_id

    def build(swarm, closers):
        volunteer = Volunteer(swarm, BlobStore(DataDir(args.data_dir).blobs), settings)
        volunteer.reannounce()
        control_server = serve_control(volunteer, args.data_dir)
        closers.append(lambda: control_server.stop(grace=1))
        return volunteer

    # the current step finishes and a checkpoint is written before it leaves
    return run_daemon(
        settings,
        args.data_dir,
        build,
        work="train_forever",
        join_timeout=120,
        swarm_id=swarm_id,
        auto_client_mode=True,  # a volunteer needs no inbound connections: it pushes
    )
