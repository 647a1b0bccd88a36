"""The ``userstream`` command: one sub-command per process or job.

userstream up [--demo]          the whole stack, supervised (embedded by default)
userstream stream-worker        Faust agents: events -> per-user sequences in Redis
userstream train-worker         periodic self-supervised updates -> embeddings
userstream api                  FastAPI: similar users, embeddings, stats, metrics
userstream replay PATH --format F [--rate R]   a data set into Kafka as a live stream
userstream generate [--rate R]  a synthetic clickstream into Kafka (or a JSONL file)
userstream settings             print the resolved settings
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

LOG = logging.getLogger("userstream")

FORMATS = ("amazon-seq", "movielens", "taobao", "jsonl", "csv")


def _settings():
    from pydantic import ValidationError

    from userstream.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"invalid settings (env vars or settings file):\n{exc}") from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_up(args) -> int:
    from userstream.stack import run_stack

    rate = args.demo_rate if args.demo else 0.0
    return run_stack(_settings(), demo_rate=rate, demo_users=args.demo_users)


def _cmd_stream_worker(args) -> int:
    from stream.app import run_worker

    return run_worker(_settings()) or 0


def _cmd_train_worker(args) -> int:
    from model.worker import main as train_main

    return train_main(_settings()) or 0


def _cmd_api(args) -> int:
    from serving.api import serve

    serve(_settings())
    return 0


def _cmd_replay(args) -> int:
    from stream.replay import replay

    path = Path(args.path)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    report = replay(path, args.format, _settings(), rate=args.rate, progress=not args.no_progress)
    print(json.dumps(report.__dict__ if hasattr(report, "__dict__") else report, default=str))
    return 0


def _cmd_generate(args) -> int:
    from stream.generator import ClickstreamGenerator

    gen = ClickstreamGenerator(
        n_users=args.users,
        n_groups=args.groups,
        items_per_group=args.items_per_group,
        seed=args.seed,
    )
    n = args.events if args.events > 0 else None
    events = gen.events(n if n is not None else 10**12, start_ts=time.time())
    if args.out:
        with open(args.out, "w") as fh:
            for ev in events:
                fh.write(json.dumps(ev) + "\n")
        if args.truth:
            truth = {u: gen.group_of(u) for u in gen.user_ids}
            Path(args.truth).write_text(json.dumps(truth))
        return 0

    from stream.replay import produce_events

    def live(evs):
        # A live demo stream: stamp each event with the wall clock as it is produced.
        for ev in evs:
            ev["ts"] = time.time()
            yield ev

    produce_events(_settings(), live(events), rate=args.rate, progress=False)
    return 0


def _cmd_settings(args) -> int:
    print(_settings().model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userstream", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML settings file (same as USERSTREAM_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack (embedded broker/Redis by default)")
    up.add_argument("--demo", action="store_true", help="also stream a live synthetic clickstream")
    up.add_argument("--demo-rate", type=float, default=300.0, help="demo events per second")
    up.add_argument("--demo-users", type=int, default=500)
    up.set_defaults(func=_cmd_up)

    sub.add_parser("stream-worker", help="Faust stream worker").set_defaults(
        func=_cmd_stream_worker
    )
    sub.add_parser("train-worker", help="training worker").set_defaults(func=_cmd_train_worker)
    sub.add_parser("api", help="FastAPI server").set_defaults(func=_cmd_api)

    rp = sub.add_parser("replay", help="produce a data set into Kafka in timestamp order")
    rp.add_argument("path")
    rp.add_argument("--format", required=True, choices=FORMATS)
    rp.add_argument("--rate", type=float, default=0.0, help="events per second, 0 = max")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_cmd_replay)

    gp = sub.add_parser("generate", help="synthetic clickstream with planted interest groups")
    gp.add_argument("--rate", type=float, default=300.0, help="events per second, 0 = max")
    gp.add_argument("--users", type=int, default=500)
    gp.add_argument("--groups", type=int, default=8)
    gp.add_argument("--items-per-group", type=int, default=60)
    gp.add_argument("--events", type=int, default=0, help="0 = endless")
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--out", help="write JSONL here instead of producing to Kafka")
    gp.add_argument("--truth", help="with --out: write {user: group} JSON here")
    gp.set_defaults(func=_cmd_generate)

    sub.add_parser("settings", help="print the resolved settings").set_defaults(func=_cmd_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["USERSTREAM_CONFIG"] = args.config
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
