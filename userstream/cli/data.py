"""Sub-commands that produce events into Kafka: replay (a data set) and generate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stream.datasets import FORMATS
from userstream.cli.common import existing, resolved_settings

__all__ = ["add_commands"]


def _print_report(report: Any) -> None:
    print(
        f"{report.events} events in {report.messages} messages, {report.failed} failed, "
        f"{report.seconds:.1f}s ({report.events_per_s:.0f} events/s)"
    )


def _cmd_replay(args: Any) -> int:
    from stream.replay import replay

    existing(args.path)
    progress = False if args.no_progress else None  # None: a bar when stderr is a terminal
    report = replay(
        Path(args.path),
        args.format,
        resolved_settings(),
        rate=args.rate,
        batch=args.batch,
        progress=progress,
    )
    _print_report(report)
    return 1 if report.failed else 0


def _cmd_generate(args: Any) -> int:
    from stream.generator import ClickstreamGenerator

    gen = ClickstreamGenerator(
        n_users=args.users,
        n_groups=args.groups,
        items_per_group=args.items_per_group,
        seed=args.seed,
        drift_every=args.drift_every,
        drift_prob=args.drift_prob,
        new_items_rate=args.new_items_rate,
        noise=args.noise,
    )
    if args.out:
        if args.events <= 0:
            raise SystemExit("--out needs a positive --events count")
        # end near now, so every timestamp is valid for the stream worker
        events = gen.events(args.events, start_ts=time.time() - args.events * gen.mean_gap_s)
        with open(args.out, "w") as fh:
            for ev in events:
                fh.write(json.dumps(ev) + "\n")
        if args.truth:
            Path(args.truth).write_text(json.dumps({u: gen.group_of(u) for u in gen.user_ids}))
        return 0

    from stream.replay import produce_events

    def live(evs):
        # A live stream: stamp each event with the wall clock as it is produced.
        for ev in evs:
            ev["ts"] = time.time()
            yield ev

    n = args.events if args.events > 0 else 10**15  # 0 = endless
    report = produce_events(
        resolved_settings(), live(gen.events(n)), rate=args.rate, progress=False, group=args.batch
    )
    _print_report(report)
    return 1 if report.failed else 0


def add_commands(sub: Any) -> None:
    rp = sub.add_parser("replay", help="produce a data set into Kafka in timestamp order")
    rp.add_argument("path")
    rp.add_argument("--format", required=True, choices=FORMATS)
    rp.add_argument("--rate", type=float, default=0.0, help="events per second, 0 = max")
    rp.add_argument(
        "--batch", type=int, default=50, help="most consecutive events of one user per message"
    )
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_cmd_replay)

    gp = sub.add_parser("generate", help="synthetic clickstream with planted interest groups")
    gp.add_argument("--rate", type=float, default=300.0, help="events per second, 0 = max")
    gp.add_argument("--users", type=int, default=500)
    gp.add_argument("--groups", type=int, default=8)
    gp.add_argument("--items-per-group", type=int, default=60)
    gp.add_argument("--events", type=int, default=0, help="0 = endless")
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--drift-every", type=int, default=0, help="events between drift rounds")
    gp.add_argument("--drift-prob", type=float, default=0.0, help="users switching per round")
    gp.add_argument(
        "--new-items-rate", type=float, default=0.0, help="chance an event adds an item"
    )
    gp.add_argument("--noise", type=float, default=0.05, help="share of out-of-group items")
    gp.add_argument("--batch", type=int, default=50, help="most events of one user per message")
    gp.add_argument("--out", help="write JSONL here instead of producing to Kafka")
    gp.add_argument("--truth", help="with --out: write {user: group} JSON here")
    gp.set_defaults(func=_cmd_generate)
