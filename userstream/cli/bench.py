"""``userstream bench``: the benchmarks of PROTOCOL.md, as commands.

``bench prequential`` runs :mod:`model.prequential`; ``bench soak`` runs
:mod:`userstream.soak` (the stack under load and faults); ``bench freshness``
runs :mod:`userstream.freshness` (produce -> served embedding under load);
``bench query`` runs :mod:`userstream.query_bench` (similar-user queries at N
users); ``bench scale`` runs :mod:`userstream.scale` (a million users through
the stack); ``bench train`` runs :mod:`model.step_bench` (a live training step
beside a bare-torch SASRec); ``bench ingest`` runs :mod:`userstream.ingest_bench`
(the stream worker against bare aiokafka, Faust and Redis loops). Settings come from the
usual sources (env vars, ``USERSTREAM_CONFIG``), then the cadence options and
``--set KEY=VALUE`` override them; the resolved settings go into the report.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from stream.datasets import FORMATS
from userstream.cli.common import existing, resolved_settings
from userstream.cli.options import add_fields, given

__all__ = ["PREQUENTIAL_SETTINGS", "add_commands", "bench_settings", "river_grid"]

LOG = logging.getLogger(__name__)

_CADENCE = ("train_interval_s", "train_every_events", "train_steps")

# What ``bench prequential`` runs with no options: the settings behind the table of
# benchmarks/README.md, "Session 14" (ML-100K). They replace the service's defaults
# (and env vars) for these fields; the cadence options and ``--set`` override them.
PREQUENTIAL_SETTINGS: dict[str, Any] = {
    "train_interval_s": 86_400.0,  # T = 1 day of stream time
    "train_every_events": 125,  # B
    "train_steps": 4,  # K
    "train_batch_size": 128,
    "learning_rate": 5e-4,
    "mlm_weight": 0.0,  # next-item loss only
    "contrastive_weight": 0.0,
    "max_len": 200,
    "sequence_length": 200,
    "replay_ratio": 2.0,  # two replayed users per dirty one,
    "replay_fill": False,  # and no more (no batch filled from the reservoir)
    "dropout": 0.2,
    "attention_dropout": 0.0,  # none on the attention weights: a faster step (benchmarks/README.md)
    "refresh_budget": 0,  # re-embed the dirty users only (not scored here)
}


def bench_settings(args: Any, defaults: dict[str, Any] | None = None):
    """The service settings with ``defaults``, then the run's options (cadence
    fields, ``--set``) over them."""
    from userstream.settings import Settings

    overrides: dict[str, Any] = {**(defaults or {}), **given(args, "settings")}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in Settings.model_fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a setting name")
        overrides[key.strip()] = value.strip()
    return resolved_settings(**overrides)


def river_grid(args: Any):
    from model.prequential.baselines import RiverMFConfig

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    return tuple(
        RiverMFConfig(int(f), int(neg), lr, args.river_l2, args.river_biased)
        for f, neg, lr in itertools.product(
            floats(args.river_factors), floats(args.river_negatives), floats(args.river_lr)
        )
    )


def neighbour_sources(text: str, models: tuple[str, ...]) -> tuple[str, ...]:
    """``--neighbours``: a comma list, ``none``, or ``auto`` (every source the run's
    models allow: ``ours`` needs incremental, ``frozen`` frozen, ``river_mf`` river_mf)."""
    from model.prequential.neighbours import NEIGHBOUR_SOURCES

    if text.strip() in ("", "none"):
        return ()
    if text.strip() == "auto":
        needs = {"ours": "incremental", "frozen": "frozen", "river_mf": "river_mf"}
        return tuple(n for n in NEIGHBOUR_SOURCES if n not in needs or needs[n] in models)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in NEIGHBOUR_SOURCES]
    if unknown:
        raise SystemExit(
            f"--neighbours: unknown source(s) {unknown}; expected some of "
            f"{','.join(NEIGHBOUR_SOURCES)} (or none)"
        )
    return names


def _cmd_prequential(args: Any) -> int:
    import torch

    from model.prequential import PrequentialConfig, run_prequential
    from model.prequential.planted import shifted_clickstream
    from model.prequential.report import table, write_report

    torch.set_num_threads(args.threads if args.threads > 0 else (os.cpu_count() or 1))
    settings = bench_settings(args, PREQUENTIAL_SETTINGS)
    shift_at = None
    groups = None
    if args.planted_groups:
        from stream.generator import ClickstreamGenerator

        gen = ClickstreamGenerator(n_users=args.planted_groups, n_groups=8, items_per_group=60,
                                   noise=0.05, seed=args.seed)  # fmt: skip
        events = list(gen.events(args.planted_groups * args.planted_events_per_user))
        groups = {u: gen.group_of(u) for u in gen.user_ids}
        source = f"planted-groups:{args.planted_groups}"
    elif args.planted_shift:
        events = shifted_clickstream(args.planted_shift, seed=args.seed)
        shift_at = args.planted_shift // 2
        source = f"planted-shift:{args.planted_shift}"
    else:
        if not args.format:
            raise SystemExit("--data needs --format")
        from stream.datasets import read_dataset

        existing(args.data)
        events = read_dataset(Path(args.data), args.format).events
        source = str(args.data)
    if args.max_events > 0:
        events = events[: args.max_events]
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    extra: dict[str, Any] = {}
    warm: dict[str, Any] = {}
    if args.warm_start:
        warm = _warm_start(args, events, settings)
        extra["warm_start"] = warm
    config = PrequentialConfig(
        window=args.window,
        warmup=warm["backlog_events"] if warm else args.warmup,
        backlog=warm["backlog_events"] if warm else 0,
        warm_start=warm.get("checkpoint"),
        frozen_steps=args.frozen_steps,
        river=river_grid(args),
        models=models,
        drift=not args.no_drift,
        catchup_factor=args.catchup_factor,
        neighbours=neighbour_sources(args.neighbours, models),
        neighbour_k=args.neighbour_k,
        neighbour_embed_every=args.neighbour_embed_every,
        exclude_seen=not args.keep_seen,
        seed=args.seed,
    )
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 10_000 == 0:
            LOG.info("%d / %d events (%.0fs)", done, total, time.perf_counter() - t0)

    if args.via_kafka:
        from model.prequential.kafka_feed import compare_via_kafka
        from model.prequential.report import via_kafka_table

        result, _, extra["via_kafka"] = compare_via_kafka(
            events, settings, config, progress=progress
        )
    else:
        try:
            from serving.index import UserIndex  # the API's index, for the `ours` neighbours

            result = run_prequential(events, settings, config, progress=progress, groups=groups,
                                     index_factory=UserIndex.build)  # fmt: skip
        except ValueError as exc:  # e.g. an unknown model name
            raise SystemExit(str(exc)) from None
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


def _warm_start(args: Any, events: list, settings: Any) -> dict[str, Any]:
    """``--warm-start``: the encoder trained offline on the backlog; its summary."""
    import tempfile

    from model.prequential.warm import backlog_events, train_backlog

    try:
        n = backlog_events(args.warm_start, len(events))
    except ValueError as exc:
        raise SystemExit(f"--warm-start: {exc}") from None
    if args.report:
        out = Path(args.report).with_suffix("")
        out = out.with_name(out.name + "-warm-start")
    else:
        out = Path(tempfile.mkdtemp(prefix="pq-warm-"))
    _, summary = train_backlog(events[:n], settings, out, max_minutes=args.warm_start_minutes)
    LOG.info("warm start: %s (best epoch %s, valid %s)", summary["checkpoint"],
             summary["best_epoch"], summary["best_valid"])  # fmt: skip
    return summary


def _cmd_soak(args: Any) -> int:
    from userstream.soak import SoakConfig, run_soak

    report = run_soak(resolved_settings(), SoakConfig(**given(args, "soak")),
                      Path(args.report) if args.report else None)  # fmt: skip
    keys = ("ok", "valid_sent", "valid_ingested", "valid_lost", "valid_duplicated",
            "dropped_as_duplicate", "invalid_sent", "invalid_dead_lettered",
            "max_refresh_wait_s", "restarts")  # fmt: skip
    for k in keys:
        print(f"{k:<24}{report[k]}")
    for name, r in report["rss_mb"].items():
        print(f"rss {name:<20}{r}")
    if args.report:
        print(f"report {args.report}")
    return 0 if report["ok"] else 1


def _cmd_freshness(args: Any) -> int:
    from userstream.freshness import FreshnessConfig, run_freshness

    report = run_freshness(resolved_settings(), FreshnessConfig(**given(args, "freshness")),
                           Path(args.report) if args.report else None)  # fmt: skip
    print(f"{'probe':<10}{'n':>6}{'p50 s':>9}{'p99 s':>9}{'ingest p50':>12}{'timeouts':>10}")
    for kind in ("new", "existing"):
        r = report[kind]
        print(f"{kind:<10}{r['n']:>6}{r['p50_s']!s:>9}{r['p99_s']!s:>9}"
              f"{r['ingest_p50_s']!s:>12}{r['timeouts']:>10}")  # fmt: skip
    print(f"training cycles: {report['cycles']}")
    print(f"load: {report['rate_achieved']} events/s of {report['rate']}")
    if args.report:
        print(f"report {args.report}")
    ok = all(report[k]["n"] > 0 and report[k]["timeouts"] == 0 for k in ("new", "existing"))
    return 0 if ok else 1


def _print_fields(report: dict, keys: tuple[str, ...], path: str | None) -> None:
    width = max(len(k) for k in keys) + 2
    for k in keys:
        print(f"{k:<{width}}{report.get(k)}")
    if path:
        print(f"report {path}")


def _cmd_query(args: Any) -> int:
    from userstream.query_bench import QueryConfig, run_query_bench

    report = run_query_bench(resolved_settings(), QueryConfig(**given(args, "query")),
                             Path(args.report) if args.report else None)  # fmt: skip
    keys = ("users", "clients", "index_kind", "p50_ms", "p99_ms", "rps", "p50_ms_1client",
            "p99_ms_1client", "rps_1client", "recall_at_10", "cold_start_s", "snapshot_start_s",
            "write_users_per_s", "rss_mb", "baselines", "ratios")  # fmt: skip
    _print_fields(report, keys, args.report)
    return 0 if report.get("errors", 0) == 0 else 1


def _cmd_scale(args: Any) -> int:
    from userstream.scale import ScaleConfig, run_scale

    report = run_scale(resolved_settings(), ScaleConfig(**given(args, "scale")),
                       Path(args.report) if args.report else None)  # fmt: skip
    keys = ("users", "items", "items_seen", "events", "produce_events_per_s",
            "ingest_events_per_s", "embedded_users", "all_embedded_s", "embed_users_per_s",
            "train_pending", "cycles", "freshness", "rss_mb", "rss_total_max_mb",
            "redis_used_mb", "redis_bytes_per_user", "within_24gib", "plot")  # fmt: skip
    _print_fields(report, keys, args.report)
    done = report["all_embedded_s"] is not None and report["ingested_s"] is not None
    return 0 if done and report["within_24gib"] else 1


def _cmd_train(args: Any) -> int:
    from model.step_bench import run_train_bench
    from userstream.bench_configs import TrainBenchConfig
    from userstream.bench_env import write_report

    report = run_train_bench(resolved_settings(), TrainBenchConfig(**given(args, "train")))
    write_report(report, Path(args.report) if args.report else None)
    keys = ("bare_s", "live_next_s", "live_default_s", "sampled_s", "large_full_s",
            "large_sampled_s", "live_vs_bare_ratio", "live_default_vs_bare_ratio",
            "step_ratio_100k_vs_10k", "step_ratio_100k_vs_10k_full", "torch_threads",
            "device")  # fmt: skip
    _print_fields(report, keys, args.report)
    return 0


def _cmd_ingest(args: Any) -> int:
    from userstream.ingest_bench import IngestConfig, run_ingest_bench

    report = run_ingest_bench(resolved_settings(), IngestConfig(**given(args, "ingest")),
                              Path(args.report) if args.report else None)  # fmt: skip
    keys = ("single_ratio", "array_ratio", "scale_out_ratio", "single_ratio_per_cpu",
            "array_ratio_per_cpu", "bare_kafka_single_events_per_s",
            "bare_kafka_array_events_per_s", "bare_faust_single_events_per_s",
            "bare_faust_single_ratio", "bare_redis_events_per_s", "worker_single_events_per_s",
            "worker_array_events_per_s", "two_workers_events_per_s", "kill", "cpu", "messages",
            "array_messages", "host_cores", "ok")  # fmt: skip
    _print_fields(report, keys, args.report)
    return 0 if report.get("ok") else 1


def _add_run(bsub: Any, name: str, help: str, config: type, func: Any) -> None:
    """A benchmark of the running service: its config's fields as options, and --report."""
    sp = bsub.add_parser(name, help=help)
    sp.add_argument("--report", help="write the JSON report here")
    add_fields(sp, config, name)
    sp.set_defaults(func=func)


def add_commands(sub: Any) -> None:
    from userstream.settings import Settings

    bench = sub.add_parser("bench", help="benchmarks (PROTOCOL.md)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    from userstream.bench_configs import TrainBenchConfig
    from userstream.freshness import FreshnessConfig
    from userstream.ingest_bench import IngestConfig
    from userstream.query_bench import QueryConfig
    from userstream.scale import ScaleConfig
    from userstream.soak import SoakConfig

    _add_run(bsub, "soak", "the real stack under load while processes are killed and restarted",
             SoakConfig, _cmd_soak)  # fmt: skip
    _add_run(bsub, "freshness", "the real stack under load: produce -> served embedding, p50/p99",
             FreshnessConfig, _cmd_freshness)  # fmt: skip
    _add_run(bsub, "query", "/users/{id}/similar over HTTP at N users, 1 and C clients, vs bare "
             "FAISS", QueryConfig, _cmd_query)  # fmt: skip
    _add_run(bsub, "scale", "a million users and 100k items through the real stack: ingest, "
             "cycles, freshness, RSS, Redis memory", ScaleConfig, _cmd_scale)  # fmt: skip
    _add_run(bsub, "train", "a live training step beside a bare-torch SASRec step, and at 10k "
             "vs 100k items (full and sampled softmax)", TrainBenchConfig, _cmd_train)  # fmt: skip
    _add_run(bsub, "ingest", "the stream worker's events/s against bare aiokafka, Faust and Redis "
             "loops; two workers; one killed mid-run", IngestConfig, _cmd_ingest)  # fmt: skip
    pq = bsub.add_parser(
        "prequential", help="test-then-train over a data set: ours vs frozen and online baselines"
    )
    src = pq.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a data set file (see --format)")
    src.add_argument(
        "--planted-shift",
        type=int,
        metavar="N",
        help="instead of --data: N planted events with an abrupt shift half way (drift demo)",
    )
    src.add_argument(
        "--planted-groups",
        type=int,
        metavar="USERS",
        help="instead of --data: a stationary planted stream of USERS users in 8 interest "
        "groups; reports every neighbour source's same-group precision@10",
    )
    pq.add_argument(
        "--planted-events-per-user", type=int, default=20, help="events per --planted-groups user"
    )
    pq.add_argument("--format", choices=FORMATS, help="format of --data")
    pq.add_argument("--report", help="write the JSON report here (and a .png plot beside it)")
    pq.add_argument("--window", type=int, default=5000, help="events per point of the curve")
    pq.add_argument("--max-events", type=int, default=0, help="only the first N events (0 = all)")
    pq.add_argument(
        "--warmup", type=float, default=0.2, help="frozen model: fraction (<1) or number of events"
    )
    pq.add_argument(
        "--frozen-steps", type=int, default=0, help="extra steps on the warm-up before freezing"
    )
    pq.add_argument(
        "--warm-start",
        type=float,
        default=0.0,
        metavar="BACKLOG",
        help="a warm start (0: cold, the protocol): the first BACKLOG of the events "
        "(fraction < 1, or a count) is a recorded backlog; the encoder is trained offline "
        "on it, starts the stream from that checkpoint (frozen keeps it), and only the "
        "events after the backlog are scored",
    )
    pq.add_argument(
        "--warm-start-minutes",
        type=float,
        default=5.0,
        help="most minutes of offline training on the backlog (early stopping may end it sooner)",
    )
    pq.add_argument(
        "--models", default="popular,river_mf,cooccurrence,frozen,incremental", help="comma list"
    )
    pq.add_argument(
        "--neighbours",
        default="auto",
        help="neighbour sources scored on the stream (PROTOCOL 3): a comma list of "
        "ours,user_knn,river_mf,frozen,random, none, or auto (all the run's models allow)",
    )
    pq.add_argument("--neighbour-k", type=int, default=20, help="similar users per query")
    pq.add_argument(
        "--neighbour-embed-every",
        type=int,
        default=10,
        help="the embedder re-embeds changed users every N events, as the live thread does "
        "within a moment (0: at training cycles only)",
    )
    pq.add_argument("--river-factors", default="64", help="comma list: a grid when several")
    pq.add_argument("--river-negatives", default="16", help="comma list")
    pq.add_argument("--river-lr", default="0.1", help="comma list")
    pq.add_argument("--river-l2", type=float, default=0.001)
    pq.add_argument("--river-biased", action="store_true", help="BiasedMF instead of FunkMF")
    pq.add_argument("--no-drift", action="store_true", help="no drift detection / catch-up")
    pq.add_argument(
        "--keep-seen",
        action="store_true",
        help="do not exclude the user's earlier items (repeat-heavy streams such as Taobao)",
    )
    pq.add_argument("--catchup-factor", type=int, default=4)
    add_fields(pq.add_argument_group("training cadence (settings)"), Settings, "settings", _CADENCE,
               default_notes={k: f"default: {PREQUENTIAL_SETTINGS[k]:g}" for k in _CADENCE})  # fmt: skip
    pq.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set learning_rate=0.003 (repeatable); without it: "
        + ", ".join(f"{k}={v:g}" for k, v in PREQUENTIAL_SETTINGS.items() if k not in _CADENCE),
    )
    pq.add_argument(
        "--via-kafka",
        action="store_true",
        help="run the same events a second time through the real broker, stream worker and "
        "Redis (use with --max-events) and report whether both runs agree",
    )
    pq.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: one per core; 1 beside other runs on a shared machine). The "
        "figures do not depend on it",
    )
    pq.add_argument("--seed", type=int, default=0)
    pq.set_defaults(func=_cmd_prequential)
