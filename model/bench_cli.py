"""``userstream bench prequential``: argument handling around :mod:`model.prequential`.

Settings come from the usual sources (env vars, ``USERSTREAM_CONFIG``), then the
cadence flags and ``--set KEY=VALUE`` override them; the resolved settings go
into the report.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["bench_settings", "river_grid", "run_prequential_cli"]

LOG = logging.getLogger(__name__)


def bench_settings(args: Any):
    from pydantic import ValidationError

    from userstream.settings import Settings

    overrides: dict[str, Any] = {}
    for flag in ("train_interval_s", "train_every_events", "train_steps"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in Settings.model_fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a setting name")
        overrides[key.strip()] = value.strip()
    try:
        base = Settings()
        return Settings(**{**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise SystemExit(f"invalid settings:\n{exc}") from None


def river_grid(args: Any):
    from model.baselines import RiverMFConfig

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    return tuple(
        RiverMFConfig(int(f), int(neg), lr, args.river_l2, args.river_biased)
        for f, neg, lr in itertools.product(
            floats(args.river_factors), floats(args.river_negatives), floats(args.river_lr)
        )
    )


def run_prequential_cli(args: Any) -> int:
    import torch

    from model.planted import shifted_clickstream
    from model.prequential import PrequentialConfig, run_prequential
    from model.prequential_report import table, write_report

    torch.set_num_threads(max(1, args.threads))
    settings = bench_settings(args)
    shift_at = None
    if args.planted_shift:
        events = shifted_clickstream(args.planted_shift, seed=args.seed)
        shift_at = args.planted_shift // 2
        source = f"planted-shift:{args.planted_shift}"
    else:
        if not args.format:
            raise SystemExit("--data needs --format")
        from stream.datasets import read_dataset

        path = Path(args.data)
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
        events = read_dataset(path, args.format).events
        source = str(path)
    if args.max_events > 0:
        events = events[: args.max_events]
    config = PrequentialConfig(
        window=args.window,
        warmup=args.warmup,
        frozen_steps=args.frozen_steps,
        river=river_grid(args),
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        drift=not args.no_drift,
        catchup_factor=args.catchup_factor,
        exclude_seen=not args.keep_seen,
        seed=args.seed,
    )
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 10_000 == 0:
            LOG.info("%d / %d events (%.0fs)", done, total, time.perf_counter() - t0)

    extra = {}
    if args.via_kafka:
        from model.prequential_kafka import compare_via_kafka
        from model.prequential_report import via_kafka_table

        result, _, extra["via_kafka"] = compare_via_kafka(
            events, settings, config, progress=progress
        )
    else:
        result = run_prequential(events, settings, config, progress=progress)
    print(table(result))
    if "via_kafka" in extra:
        print("\nin process vs via Kafka (broker, stream worker, Redis) on the same events:")
        print(via_kafka_table(extra["via_kafka"], config.k))
    if args.report:
        report = Path(args.report)
        write_report(
            result,
            report,
            title=f"prequential HR@10: {Path(source).name}",
            shift_at=shift_at,
            data=source,
            format=args.format,
            command=" ".join(sys.argv),
            **extra,
        )
        print(f"report {report}, plot {report.with_suffix('.png')}")
    return 0
