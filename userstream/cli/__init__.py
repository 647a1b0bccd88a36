"""The ``userstream`` command: one sub-command per process or job.

userstream up [--demo]          the whole stack, supervised (embedded by default)
userstream stream-worker        Faust agents: events -> per-user sequences in Redis
userstream train-worker         periodic self-supervised updates -> embeddings
userstream api                  FastAPI: similar users, embeddings, stats, metrics
userstream replay PATH --format F [--rate R]   a data set into Kafka as a live stream
userstream generate [--rate R]  a synthetic clickstream into Kafka (or a JSONL file)
userstream train --data PATH --format F [--out DIR]     offline training, early stopping on valid
userstream evaluate --data PATH --format F --checkpoint DIR [--report FILE]   PROTOCOL section 1
userstream finetune --checkpoint DIR --data PATH --format F --labels FILE --out DIR   a head
userstream export --checkpoint DIR --out HF_DIR   a checkpoint as a Hugging Face model folder
userstream bench prequential --data PATH --format F   test-then-train benchmark (PROTOCOL 2)
userstream settings             print the resolved settings
userstream token [--scope S]    a new API token and the hash line for API_TOKENS
userstream forget ID            erase a user everywhere; prints what was erased (JSON)

Each group of sub-commands lives in its own module: :mod:`~userstream.cli.service`
(the processes), :mod:`~userstream.cli.data` (producers),
:mod:`~userstream.cli.offline` (train, evaluate, finetune, export) and
:mod:`~userstream.cli.bench`. Options that set a configuration field are
derived from its typed definition (:mod:`~userstream.cli.options`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["build_parser", "main"]


def _setup_logging(verbose: bool) -> None:
    from userstream.logs import configure_logging

    try:
        from userstream.settings import Settings

        fmt = Settings().log_format
    except Exception:  # noqa: BLE001 - invalid settings: the command reports them itself
        fmt = "text"
    configure_logging(fmt, logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    from userstream.cli import admin, bench, data, offline, service

    p = argparse.ArgumentParser(prog="userstream", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML settings file (same as USERSTREAM_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    service.add_commands(sub)
    data.add_commands(sub)
    offline.add_commands(sub)
    bench.add_commands(sub)
    admin.add_commands(sub)
    service.add_settings_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["USERSTREAM_CONFIG"] = args.config
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
