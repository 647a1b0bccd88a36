"""Report of a prequential run: the JSON (PROTOCOL section 5), a table, a PNG plot.

``write_report(run_prequential(...), Path("out/ml100k.json"))`` writes
``out/ml100k.json`` and ``out/ml100k.png``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.prequential.loop import MODELS, PrequentialResult

__all__ = [
    "neighbour_ratio",
    "plot",
    "recovery",
    "summary",
    "table",
    "via_kafka_table",
    "write_report",
]

LOG = logging.getLogger(__name__)


def _f(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def recovery(result: PrequentialResult, shift_at: int, window: int, level: float = 0.8) -> dict:
    """Per model: HR@k in the window before ``shift_at``, the lowest windowed HR
    after it, and how many events after the shift the windowed HR@k first gets
    back to ``level`` x its pre-shift value (None: not within the stream)."""
    out = {}
    for name in result.models:
        ends, vals = result.curve(name, window)
        before = vals[ends <= shift_at]
        after_ends, after = ends[ends > shift_at], vals[ends > shift_at]
        if not len(before) or not len(after):
            continue
        pre = float(before[-1])
        back = [
            int(e - shift_at) for e, v in zip(after_ends, after, strict=True) if v >= level * pre
        ]
        out[name] = {
            "hr_before": _f(pre),
            "hr_min_after": _f(float(after.min())),
            "hr_last": _f(float(after[-1])),
            f"events_to_{int(level * 100)}pct": back[0] if back else None,
        }
    return out


def summary(result: PrequentialResult, **extra: Any) -> dict[str, Any]:
    """The report JSON: models, events, settings, curves, drifts, cycles, machine."""
    r = result
    k = r.config.k
    models = {}
    for name in r.models:
        models[name] = {
            f"hr@{k}": _f(r.mean(name)),
            f"ndcg@{k}": _f(r.mean(name, "ndcg")),
            "events_per_s": _f(r.events_per_s(name)),
            "seconds": _f(r.seconds.get(name, math.nan)),
            f"hr@{k}_new_targets": _f(r.mean(name, mask=~r.repeat & ~r.new_item)),
            f"hr@{k}_after_warmup": _f(r.mean(name, mask=np.arange(r.n_events) >= r.warmup_events)),
        }
    curves = {}
    for name in r.models:
        ends, vals = r.curve(name)
        curves[name] = {"event": ends.tolist(), f"hr@{k}": [_f(v) for v in vals]}
    neighbours = {}
    for name in r.neighbour_ranks:
        ends, vals = r.curve(name, neighbours=True)
        neighbours[name] = {
            f"hr@{k}": _f(r.neighbour_mean(name)),
            f"ndcg@{k}": _f(r.neighbour_mean(name, "ndcg")),
            "seconds": _f(r.neighbour_seconds.get(name, math.nan)),
            "curve": {"event": ends.tolist(), f"hr@{k}": [_f(v) for v in vals]},
        }
    import torch

    out = {
        "protocol": "PROTOCOL.md section 2 (prequential, test-then-train), full ranking over "
        "the items seen so far, the user's earlier items excluded, ties against the target",
        "models": models,
        "events": r.n_events,
        "scored_events": int(r.scored.sum()),
        "repeat_targets": int(r.repeat.sum()),
        "new_item_targets": int(r.new_item.sum()),
        "invalid_events": r.invalid,
        "warmup_events": r.warmup_events,
        "settings": json.loads(r.settings.model_dump_json(exclude={"data_dir"})),
        "bench": {
            "k": k,
            "window": r.config.window,
            "warmup": r.config.warmup,
            "frozen_steps": r.config.frozen_steps,
            "river": [c.label for c in r.config.river],
            "cooccurrence_window": r.config.cooccurrence_window,
            "drift": r.config.drift,
            "drift_delta": r.config.drift_delta,
            "catchup_factor": r.config.catchup_factor,
            "exclude_seen": r.config.exclude_seen,
            "neighbour_sources": list(r.config.neighbours),
            "neighbour_k": r.config.neighbour_k,
            "neighbour_embed_every": r.config.neighbour_embed_every,
            "seed": r.config.seed,
            "backlog": r.config.backlog,
            "warm_start": r.config.warm_start,
        },
        "river_grid": r.river_grid,
        "curves": curves,
        "neighbours_protocol": "PROTOCOL.md section 3 (neighbour usefulness): for every scored "
        f"event, the user's top-{r.config.neighbour_k} similar users from each source as it "
        "stood just before the event; items ranked by how many of them have the item so far",
        "neighbours": neighbours,
        "neighbours_ratio": neighbour_ratio(r),
        "neighbours_precision@10": {n: _f(v) for n, v in r.precision.items()},
        "drifts": [
            {
                "event": pos,
                "signal": d.signal,
                "at": d.at,
                "before": _f(d.before),
                "after": _f(d.after),
            }
            for pos, d in r.drifts
        ],
        "cycles": len(r.cycles),
        "train_s": _f(sum(c["train_s"] for c in r.cycles)),
        "wall_s": _f(r.wall_s),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.update(extra)
    return out


def neighbour_ratio(result: PrequentialResult) -> dict[str, Any] | None:
    """HR@k of ``ours`` over the best other neighbour source (``random`` included),
    with that source's name; None without ``ours`` or another source."""
    r = result
    others = {n: r.neighbour_mean(n) for n in r.neighbour_ranks if n != "ours"}
    if "ours" not in r.neighbour_ranks or not others:
        return None
    best = max(others, key=lambda n: others[n])
    ours = r.neighbour_mean("ours")
    ratio = ours / others[best] if others[best] > 0 else math.inf
    return {"best_other": best, f"hr@{r.config.k}_best_other": _f(others[best]),
            "ours_over_best_other": _f(ratio)}  # fmt: skip


def table(result: PrequentialResult) -> str:
    k = result.config.k
    order = [m for m in MODELS if m in result.models] + [
        m for m in result.models if m not in MODELS
    ]
    lines = [f"{'model':<14}{'HR@' + str(k):>9}{'NDCG@' + str(k):>9}{'events/s':>11}"]
    for name in order:
        lines.append(
            f"{name:<14}{result.mean(name):>9.4f}{result.mean(name, 'ndcg'):>9.4f}"
            f"{result.events_per_s(name):>11.0f}"
        )
    if result.config.warm_start is not None:
        lines.append(
            f"WARM START: the encoder began from a checkpoint trained offline on the first "
            f"{result.config.backlog} events (not scored); frozen is that checkpoint"
        )
    lines.append(
        f"{result.n_events} events, {int(result.scored.sum())} scored, "
        f"{len(result.cycles)} training cycles, {len(result.drifts)} drifts, "
        f"wall {result.wall_s:.0f}s"
    )
    if result.neighbour_ranks:
        lines.append(
            f"neighbours (top {result.config.neighbour_k} similar users; next item by their "
            f"items so far):"
        )
        lines.append(f"  {'source':<12}{'HR@' + str(k):>9}{'NDCG@' + str(k):>9}{'P@10 group':>12}")
        for name in result.neighbour_ranks:
            p = result.precision.get(name)
            lines.append(
                f"  {name:<12}{result.neighbour_mean(name):>9.4f}"
                f"{result.neighbour_mean(name, 'ndcg'):>9.4f}"
                f"{'' if p is None else f'{p:.4f}':>12}"
            )
        ratio = neighbour_ratio(result)
        if ratio is not None:
            lines.append(
                f"  ours / best other ({ratio['best_other']}): {ratio['ours_over_best_other']:.2f}x"
            )
    if result.river_grid:
        lines.append("River grid (HR@10, NDCG@10, events/s):")
        for g in result.river_grid:
            lines.append(
                f"  {g['config']:<44}{g['hr@10']:.4f}  {g['ndcg@10']:.4f}  {g['events_per_s']:.0f}"
            )
    return "\n".join(lines)


def via_kafka_table(via: dict[str, Any], k: int = 10) -> str:
    """``bench prequential --via-kafka``: both runs side by side and whether they agree
    (``via`` as made by :func:`model.prequential.kafka_feed.compare_via_kafka`)."""
    a = via["agreement"]
    lines = [
        f"{'model':<14}{'HR@' + str(k):>9}{'(Kafka)':>9}{'NDCG@' + str(k):>9}{'(Kafka)':>9}"
        f"{'max |diff|/event':>18}"
    ]
    for name, m in via["models"].items():
        lines.append(
            f"{name:<14}{m[f'hr@{k}_in_process']:>9.4f}{m[f'hr@{k}']:>9.4f}"
            f"{m[f'ndcg@{k}_in_process']:>9.4f}{m[f'ndcg@{k}']:>9.4f}"
            f"{a['metrics'][name]['max_abs_diff_per_event']:>18.3g}"
        )

    def same(ok: bool) -> str:
        return "identical" if ok else "DIFFER"

    lines += [
        f"via Kafka: {via['events']} events in {via['messages']} messages, {via['chunks']} "
        f"chunks, {via['partitions']} partitions, {via['redis_reads']} sequences read from "
        f"Redis for scoring",
        f"wall: in process {via['wall_s_in_process']:.1f}s, via Kafka {via['wall_s']:.1f}s "
        f"(of which producing {via['produce_s']:.1f}s + waiting for the stream worker "
        f"{via['sync_s'] - via['produce_s']:.1f}s; "
        f"start {via['startup_s']:.1f}s, in all {via['wall_s_total']:.1f}s)",
        f"agreement: sequences {same(a['sequences'])} ({a['users']} users), counters "
        f"{same(a['counters'])}, {a['cycles']} cycles {same(a['cycles_identical'])} "
        f"(dirty sets, replay, versions), cycle loss max |diff| {a['cycle_loss_max_abs_diff']:.3g}, "
        f"drifts {same(a['drifts_identical'])}; metrics: {a['verdict']}",
    ]
    return "\n".join(lines)


def plot(
    result: PrequentialResult,
    path: Path,
    title: str = "",
    shift_at: int | None = None,
    window: int | None = None,
) -> Path:
    """Windowed HR@k of every model over the stream; warm-up end, drifts, shift marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result.neighbour_ranks else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 4.8 * panels), squeeze=False)
    ax = axes[0, 0]
    order = [m for m in MODELS if m in result.models]
    for name in order:
        ends, vals = result.curve(name, window)
        ax.plot(ends, vals, marker=".", label=name, lw=2 if name == "incremental" else 1.2)
    ax.axvline(result.warmup_events, color="gray", ls=":", lw=1)
    ax.text(result.warmup_events, ax.get_ylim()[1], " frozen from here", color="gray",
            va="top", fontsize=8)  # fmt: skip
    if shift_at is not None:
        ax.axvline(shift_at, color="black", ls="--", lw=1.2, label="planted shift")
    labelled = set()
    for pos, d in result.drifts:
        color = "red" if d.signal == "hit_rate" else "purple"
        label = f"drift ({d.signal})" if d.signal not in labelled else None
        labelled.add(d.signal)
        ax.axvline(pos, color=color, ls="-", lw=0.8, alpha=0.7, label=label)
    k = result.config.k
    ax.set_xlabel("event (timestamp order)")
    ax.set_ylabel(f"HR@{k}, window of {window or result.config.window} events")
    ax.set_title(title or "prequential HR@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if panels == 2:
        nx = axes[1, 0]
        for name in result.neighbour_ranks:
            ends, vals = result.curve(name, window, neighbours=True)
            nx.plot(ends, vals, marker=".", label=name, lw=2 if name == "ours" else 1.2)
        nx.axvline(result.warmup_events, color="gray", ls=":", lw=1)
        nx.set_xlabel("event (timestamp order)")
        nx.set_ylabel(f"HR@{k} from neighbours' items")
        nx.set_title(f"neighbour usefulness: top {result.config.neighbour_k} similar users")
        nx.grid(alpha=0.3)
        nx.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    result: PrequentialResult,
    path: Path,
    title: str = "",
    shift_at: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``path`` (JSON) and ``path`` with ``.png`` (the plot); returns the JSON."""
    data = summary(result, **extra)
    if shift_at is not None:
        data["shift_at"] = shift_at
        data["recovery"] = recovery(result, shift_at, result.config.window)
    png = plot(result, path.with_suffix(".png"), title=title, shift_at=shift_at)
    data["plot"] = png.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    LOG.info("report %s, plot %s", path, png)
    return data
