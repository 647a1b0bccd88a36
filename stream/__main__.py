"""``python -m stream``: the stream worker, and the producers of the demo.

    python -m stream [--loglevel info]                  run the stream worker
    python -m stream replay PATH --format movielens     produce a data set in time order
    python -m stream generate --events 100000           produce a synthetic clickstream

Settings come from the environment / ``USERSTREAM_CONFIG`` like every
userstream process (e.g. ``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``,
``REDIS_PREFIX``, ``STREAM_APP_ID``, ``EVENTS_TOPIC``).
"""

from __future__ import annotations

import argparse
import logging
import time

from stream.datasets import FORMATS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stream", description="userstream stream stage")
    parser.add_argument("--loglevel", default="info", help="debug, info, warning, ...")
    sub = parser.add_subparsers(dest="cmd", metavar="{worker,replay,generate}")
    sub.add_parser("worker", help="run the stream worker (the default)")
    rp = sub.add_parser("replay", help="produce a recorded data set in timestamp order")
    rp.add_argument("path")
    rp.add_argument("--format", required=True, choices=FORMATS)
    rp.add_argument("--rate", type=float, default=0.0, help="events/s, 0 = as fast as possible")
    rp.add_argument(
        "--batch", type=int, default=50, help="most consecutive events of a user per message"
    )
    rp.add_argument("--no-progress", action="store_true")
    gp = sub.add_parser("generate", help="produce a synthetic clickstream with planted groups")
    gp.add_argument("--events", type=int, default=100_000)
    gp.add_argument("--users", type=int, default=1000)
    gp.add_argument("--groups", type=int, default=10)
    gp.add_argument("--items-per-group", type=int, default=100)
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--drift-every", type=int, default=0)
    gp.add_argument("--drift-prob", type=float, default=0.0)
    gp.add_argument("--new-items-rate", type=float, default=0.0)
    gp.add_argument("--noise", type=float, default=0.05)
    gp.add_argument("--rate", type=float, default=0.0, help="events/s, 0 = as fast as possible")
    gp.add_argument("--batch", type=int, default=50)
    gp.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.cmd in (None, "worker"):
        from stream.app import run_worker

        run_worker(loglevel=args.loglevel)
        return
    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from stream.replay import produce_events, replay
    from userstream.settings import Settings

    settings = Settings()
    progress = None if not args.no_progress else False
    if args.cmd == "replay":
        report = replay(
            args.path, args.format, settings, rate=args.rate, batch=args.batch, progress=progress
        )
    else:
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
        start = time.time() - args.events * gen.mean_gap_s  # end near now: valid timestamps
        report = produce_events(
            settings,
            gen.events(args.events, start_ts=start),
            rate=args.rate,
            progress=progress,
            total=args.events,
            group=args.batch,
        )
    print(
        f"{report.events} events in {report.messages} messages, {report.failed} failed, "
        f"{report.seconds:.1f}s ({report.events_per_s:.0f} events/s)"
    )


if __name__ == "__main__":
    main()
