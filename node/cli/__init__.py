"""The ``mergeswarm`` console script: parse, dispatch, report errors in one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from node.daemon import logs
from protocol.errors import MergeswarmError

from . import blob, delta, demo, doctor, genesis, handover, merge, node, rounds, seed, watch

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergeswarm",
        description="Decentralized merge-training: fine-tune locally, share sparse deltas, merge.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    delta.register(sub)
    genesis.register(sub)
    merge.register(sub)
    demo.register(sub)
    seed.register(sub)
    blob.register(sub)
    node.register(sub)
    rounds.register(sub)
    handover.register(sub)
    watch.register(sub)
    doctor.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    # hivemind reads its level once, at import (done lazily by the subcommands): its INFO
    # lines (new identities, DHT chatter) are noise unless asked for.
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if args.verbose else "WARNING")
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error, and stdout cannot be flushed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MergeswarmError, OSError) as exc:
        print(f"mergeswarm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mergeswarm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, details with -v
        logger.debug("unexpected error", exc_info=True)
        print(
            f"mergeswarm: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)",
            file=sys.stderr,
        )
        return 1
