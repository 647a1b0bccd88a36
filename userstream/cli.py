"""The ``userstream`` command: one sub-command per process or job.

userstream up [--demo]          the whole stack, supervised (embedded by default)
userstream stream-worker        Faust agents: events -> per-user sequences in Redis
userstream train-worker         periodic self-supervised updates -> embeddings
userstream api                  FastAPI: similar users, embeddings, stats, metrics
userstream replay PATH --format F [--rate R]   a data set into Kafka as a live stream
userstream generate [--rate R]  a synthetic clickstream into Kafka (or a JSONL file)
userstream bench prequential --data PATH --format F   test-then-train benchmark (PROTOCOL 2)
userstream train --data PATH --format F [--out DIR]     offline training, early stopping on valid
userstream evaluate --data PATH --format F --checkpoint DIR [--report FILE]   PROTOCOL section 1
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


def _print_report(report) -> None:
    print(
        f"{report.events} events in {report.messages} messages, {report.failed} failed, "
        f"{report.seconds:.1f}s ({report.events_per_s:.0f} events/s)"
    )


def _cmd_replay(args) -> int:
    from stream.replay import replay

    path = Path(args.path)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    progress = False if args.no_progress else None  # None: a bar when stderr is a terminal
    report = replay(
        path, args.format, _settings(), rate=args.rate, batch=args.batch, progress=progress
    )
    _print_report(report)
    return 1 if report.failed else 0


def _cmd_generate(args) -> int:
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
        _settings(), live(gen.events(n)), rate=args.rate, progress=False, group=args.batch
    )
    _print_report(report)
    return 1 if report.failed else 0


def _cmd_train(args) -> int:
    import dataclasses

    from model.datasets import load_sequences
    from model.offline import OfflineConfig, train_offline
    from model.split import leave_one_out

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = Path(args.data)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OfflineConfig)}
    config = OfflineConfig(**{k: v for k, v in given.items() if v is not None})
    split = leave_one_out(load_sequences(path, args.format))
    if len(split) == 0:
        raise SystemExit(f"{path}: no user has the 3 behaviors leave-one-out needs")
    result = train_offline(split, config, args.out, _settings(), progress=not args.no_progress)
    print(
        f"{'best' if result.config.select == 'valid' else 'last'} epoch {result.best_epoch}: valid "
        + ", ".join(f"{k} {v:.4f}" for k, v in result.best_valid.items())
        + f"; {result.seconds:.0f}s ({result.stopped}); checkpoint {result.checkpoint}"
    )
    return 0


def _cmd_evaluate(args) -> int:
    from model.evaluate import evaluate_checkpoint

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for p in (Path(args.data), Path(args.checkpoint)):
        if not p.exists():
            raise SystemExit(f"{p} does not exist")
    evaluate_checkpoint(args.data, args.format, args.checkpoint, _settings(), args.report)
    return 0


def _cmd_bench_prequential(args) -> int:
    from model.bench_cli import run_prequential_cli

    return run_prequential_cli(args)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (PROTOCOL.md)")
    bsub = bench.add_subparsers(dest="bench", required=True)
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
        "--models", default="popular,river_mf,cooccurrence,frozen,incremental", help="comma list"
    )
    pq.add_argument("--river-factors", default="32", help="comma list: a grid when several")
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
    pq.add_argument("--train-interval-s", type=float, help="setting T (stream seconds)")
    pq.add_argument("--train-every-events", type=int, help="setting B")
    pq.add_argument("--train-steps", type=int, help="setting K")
    pq.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set learning_rate=0.003 (repeatable)",
    )
    pq.add_argument(
        "--via-kafka",
        action="store_true",
        help="run the same events a second time through the real broker, stream worker and "
        "Redis (use with --max-events) and report whether both runs agree",
    )
    pq.add_argument("--threads", type=int, default=1, help="torch threads (machines are shared)")
    pq.add_argument("--seed", type=int, default=0)
    pq.set_defaults(func=_cmd_bench_prequential)


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

    tp = sub.add_parser("train", help="offline training with early stopping on validation")
    tp.add_argument("--data", required=True, help="data set file")
    tp.add_argument("--format", required=True, choices=FORMATS)
    tp.add_argument("--out", default="benchmarks/out/train", help="checkpoint, log, curves")
    tp.add_argument("--max-epochs", type=int, dest="max_epochs")
    tp.add_argument("--patience", type=int, help="epochs without better valid NDCG@10")
    tp.add_argument(
        "--lr-patience",
        type=int,
        dest="lr_patience",
        help="epochs without better valid NDCG@10 before the lr is cut (0: never)",
    )
    tp.add_argument("--lr-decay", type=float, dest="lr_decay", help="factor of each lr cut")
    tp.add_argument("--batch-size", type=int, dest="batch_size")
    tp.add_argument("--learning-rate", type=float, dest="learning_rate")
    tp.add_argument("--max-len", type=int, dest="max_len")
    tp.add_argument("--hidden", type=int)
    tp.add_argument("--layers", type=int)
    tp.add_argument("--heads", type=int)
    tp.add_argument("--dropout", type=float, help="default: derived from sequence lengths")
    tp.add_argument(
        "--lowpass-alpha",
        type=float,
        dest="lowpass_alpha",
        help="share of the low-pass branch beside attention (0: plain attention)",
    )
    tp.add_argument("--lowpass-window", type=int, dest="lowpass_window")
    tp.add_argument(
        "--post-norm",
        action=argparse.BooleanOptionalAction,
        dest="post_norm",
        help="LayerNorm after each residual (default) or, --no-post-norm, before each sublayer",
    )
    tp.add_argument("--positions", choices=("absolute", "relative"))
    tp.add_argument("--weight-decay", type=float, dest="weight_decay")
    tp.add_argument(
        "--ema-decay",
        type=float,
        dest="ema_decay",
        help="evaluate and keep a moving average of the weights with this decay (0: raw weights)",
    )
    tp.add_argument("--next-weight", type=float, dest="next_weight")
    tp.add_argument("--mlm-weight", type=float, dest="mlm_weight")
    tp.add_argument("--contrastive-weight", type=float, dest="contrastive_weight")
    tp.add_argument("--future-weight", type=float, dest="future_weight")
    tp.add_argument("--bag-weight", type=float, dest="bag_weight")
    tp.add_argument("--item-bag-weight", type=float, dest="item_bag_weight")
    tp.add_argument(
        "--examples",
        choices=("windows", "prefixes"),
        help="windows: next-item loss at every step of a user's window; prefixes: one example "
        "per target, next-item loss at its last step (default: derived from sequence lengths)",
    )
    tp.add_argument(
        "--select",
        choices=("valid", "last"),
        help="keep the best valid NDCG@10 epoch (default) or the last epoch of the budget",
    )
    tp.add_argument("--seed", type=int)
    tp.add_argument("--max-minutes", type=float, dest="max_minutes", help="wall-clock budget")
    tp.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    tp.add_argument("--no-progress", action="store_true")
    tp.set_defaults(func=_cmd_train, eval_batch_size=None)

    ep = sub.add_parser("evaluate", help="leave-one-out full-ranking HR/NDCG of a checkpoint")
    ep.add_argument("--data", required=True, help="data set file")
    ep.add_argument("--format", required=True, choices=FORMATS)
    ep.add_argument("--checkpoint", required=True, help="folder of `train --out` or a .pt file")
    ep.add_argument("--report", help="write the JSON report here")
    ep.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    ep.set_defaults(func=_cmd_evaluate)

    _add_bench(sub)
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
