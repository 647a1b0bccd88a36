"""Sub-commands that run the service's processes: up, stream-worker, train-worker, api."""

from __future__ import annotations

from typing import Any

from userstream.cli.common import resolved_settings

__all__ = ["add_commands", "add_settings_command"]


def _cmd_up(args: Any) -> int:
    from userstream.stack import run_stack

    rate = args.demo_rate if args.demo else 0.0
    return run_stack(resolved_settings(), demo_rate=rate, demo_users=args.demo_users)


def _cmd_stream_worker(args: Any) -> int:
    from stream.app import run_worker

    return run_worker(resolved_settings()) or 0


def _cmd_train_worker(args: Any) -> int:
    from model.live.worker import main as train_main

    return train_main(resolved_settings()) or 0


def _cmd_api(args: Any) -> int:
    from serving.api import serve

    serve(resolved_settings())
    return 0


def _cmd_settings(args: Any) -> int:
    print(resolved_settings().model_dump_json(indent=2))
    return 0


def add_commands(sub: Any) -> None:
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


def add_settings_command(sub: Any) -> None:
    sub.add_parser("settings", help="print the resolved settings").set_defaults(func=_cmd_settings)
