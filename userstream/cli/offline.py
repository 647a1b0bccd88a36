"""Sub-commands for recorded data: train, evaluate, finetune, export.

``train`` takes every field of :class:`~userstream.settings.ModelSettings` and
of :class:`~userstream.settings.OfflineConfig` as an option (derived, see
:mod:`userstream.cli.options`); defaults are ``OfflineConfig``'s (the ranking
preset), not the service's environment settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream.datasets import FORMATS
from userstream.cli.common import existing, set_threads
from userstream.cli.options import add_fields, given

__all__ = ["add_commands"]


def _cmd_train(args: Any) -> int:
    from pydantic import ValidationError

    from model.offline import leave_one_out, load_sequences, train_offline
    from userstream.settings import OfflineConfig

    set_threads(args.threads)
    existing(args.data)
    try:
        config = OfflineConfig().with_model(**given(args, "model")).replace(**given(args, "run"))
    except ValidationError as exc:
        raise SystemExit(f"invalid training options:\n{exc}") from None
    split = leave_one_out(load_sequences(args.data, args.format))
    if len(split) == 0:
        raise SystemExit(f"{args.data}: no user has the 3 behaviors leave-one-out needs")
    result = train_offline(split, config, args.out, progress=not args.no_progress)
    print(
        f"{'best' if result.config.select == 'valid' else 'last'} epoch {result.best_epoch}: valid "
        + ", ".join(f"{k} {v:.4f}" for k, v in result.best_valid.items())
        + f"; {result.seconds:.0f}s ({result.stopped}); checkpoint {result.checkpoint}"
    )
    return 0


def _cmd_evaluate(args: Any) -> int:
    from model.offline import evaluate_checkpoint

    set_threads(args.threads)
    existing(args.data, args.checkpoint)
    evaluate_checkpoint(args.data, args.format, args.checkpoint, args.report, device=args.device)
    return 0


def _cmd_finetune(args: Any) -> int:
    from pydantic import ValidationError

    from model.finetune import run_finetune
    from userstream.settings import FinetuneConfig

    set_threads(args.threads)
    existing(args.data, args.checkpoint, args.labels)
    try:
        config = FinetuneConfig(**given(args, "finetune"))
    except ValidationError as exc:
        raise SystemExit(f"invalid fine-tuning options:\n{exc}") from None
    try:
        report = run_finetune(
            args.checkpoint,
            args.data,
            args.format,
            args.labels,
            args.out,
            config,
            user_column=args.user_column,
            label_column=args.label_column,
        )
    except ValueError as exc:  # a labels file that cannot be used: say why
        raise SystemExit(str(exc)) from None
    held = report["held_out"]
    print(
        f"{report['label_column']}: {report['classes']} classes, {report['train_users']} "
        f"users trained, {report['held_out_users']} held out: accuracy {held['accuracy']:.4f} "
        f"(majority class {held['majority_accuracy']:.4f}), macro-F1 {held['macro_f1']:.4f}; "
        f"{report['predicted_users']} users predicted into {Path(args.out) / 'predictions.csv'}"
    )
    return 0


def _cmd_export(args: Any) -> int:
    from model.hf import export_checkpoint

    existing(args.checkpoint)
    path = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {path} to {args.out} (config.json, model.safetensors, vocab.json)")
    return 0


def add_commands(sub: Any) -> None:
    from userstream.settings import DERIVABLE, FinetuneConfig, ModelSettings, OfflineConfig

    tp = sub.add_parser("train", help="offline training with early stopping on validation")
    tp.add_argument("--data", required=True, help="data set file")
    tp.add_argument("--format", required=True, choices=FORMATS)
    tp.add_argument("--out", default="benchmarks/out/train", help="checkpoint, log, curves")
    tp.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    tp.add_argument("--no-progress", action="store_true")
    derived = dict.fromkeys(DERIVABLE, "default: derived from the sequence lengths")
    add_fields(tp.add_argument_group("the learner (ModelSettings)"), ModelSettings, "model",
               skip=("item_min_count", "item_ttl_s", "item_live_max"),  # live worker only
               defaults=OfflineConfig().model, default_notes=derived)  # fmt: skip
    add_fields(tp.add_argument_group("the run (OfflineConfig)"), OfflineConfig, "run")
    tp.set_defaults(func=_cmd_train)

    ep = sub.add_parser("evaluate", help="leave-one-out full-ranking HR/NDCG of a checkpoint")
    ep.add_argument("--data", required=True, help="data set file")
    ep.add_argument("--format", required=True, choices=FORMATS)
    ep.add_argument("--checkpoint", required=True, help="folder of `train --out` or a .pt file")
    ep.add_argument("--report", help="write the JSON report here")
    ep.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    ep.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ep.set_defaults(func=_cmd_evaluate)

    fp = sub.add_parser(
        "finetune",
        help="fine-tune a head on the pre-trained encoder for a labelled user attribute",
        description="Train a classifier head (and a copy of the encoder) for one labelled "
        "attribute per user, report it on held-out users and predict every user. Labels: a "
        "CSV or tab-separated file with a header row naming a user column and a label column "
        "(RecBole's 'name:type' headers are accepted, e.g. ml-100k.user).",
    )
    fp.add_argument("--checkpoint", required=True, help="folder of `train --out` or a .pt file")
    fp.add_argument("--data", required=True, help="the users' behaviors (see --format)")
    fp.add_argument("--format", required=True, choices=FORMATS)
    fp.add_argument("--labels", required=True, help="CSV / TSV: a user column and a label column")
    fp.add_argument("--label-column", default="label", help="the label column's name")
    fp.add_argument("--user-column", default="user_id", help="the user column's name")
    fp.add_argument("--out", required=True, help="classifier.pt, report.json, predictions.csv")
    fp.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    add_fields(fp.add_argument_group("fine-tuning (FinetuneConfig)"), FinetuneConfig, "finetune")
    fp.set_defaults(func=_cmd_finetune)

    xp = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    xp.add_argument("--checkpoint", required=True, help="folder of `train --out` or a .pt file")
    xp.add_argument("--out", required=True, help="the folder to write (config.json, ...)")
    xp.set_defaults(func=_cmd_export)
