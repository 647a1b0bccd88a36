r"""Read recorded interaction data sets as event dicts in timestamp order.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.inter"
>>> _ = path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
...                     "259\t255\t4\t874724710\n259\t286\t4\t874724700\n")
>>> ds = read_dataset(path, "movielens")
>>> ds.count, next(iter(ds))  # timestamp order
(2, {'user_id': '259', 'item_id': '286', 'behavior': 'rate', 'ts': 874724700.0, 'props': {'rating': 4.0}})

Formats (see ../shared/data/README.md for the real files):

* ``amazon-seq``: ``user item1 item2 ...`` per line, chronological per user and
  without timestamps. Users are interleaved round-robin (round r holds the r-th
  item of every user that has one, in file order), which keeps each user's
  order; timestamps are synthesized, strictly increasing by ``step_s``;
  behavior ``purchase``.
* ``movielens``: RecBole atomic ``.inter`` (tab separated, header
  ``user_id:token item_id:token rating:float timestamp:float``); behavior
  ``rate``, the rating in ``props``.
* ``taobao``: ``user_id,item_id,category_id,behavior,timestamp`` without a
  header; behaviors pv/cart/fav/buy become view/cart/fav/purchase (others pass
  through), the category in ``props``.
* ``jsonl``: one event object per line, passed through unchanged.
* ``csv``: a header naming at least ``user_id,item_id,behavior,ts``;
  ``event_id`` and ``text`` columns are kept, other columns go to ``props``.

Every reader sorts by timestamp with a stable sort (ties keep file order), so
the whole file is held in memory: fine for the data sets here (up to a few
million rows), not for the full 100M-row Taobao file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.events import to_seconds

__all__ = ["FORMATS", "Dataset", "TAOBAO_BEHAVIORS", "read_dataset"]

LOG = logging.getLogger(__name__)

TAOBAO_BEHAVIORS = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "purchase"}
AMAZON_START_TS = 1_500_000_000.0


@dataclass
class Dataset:
    """Events of one file, already in timestamp order; iterate to get dicts."""

    path: Path
    fmt: str
    events: list[dict[str, Any]] = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


def _by_time(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(ev: dict[str, Any]) -> float:
        try:
            return to_seconds(ev.get("ts"))
        except ValueError:
            return math.inf  # unreadable times go last; the worker dead-letters them

    events.sort(key=key)  # stable: ties keep file order
    return events


def _amazon_seq(path: Path, start_ts: float = AMAZON_START_TS, step_s: float = 1.0) -> list[dict]:
    users: list[tuple[str, list[str]]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2:
                users.append((parts[0], parts[1:]))
    out: list[dict] = []
    ts = start_ts
    active = users
    r = 0
    while active:
        for user, items in active:
            out.append({"user_id": user, "item_id": items[r], "behavior": "purchase", "ts": ts})
            ts += step_s
        r += 1
        active = [(u, items) for u, items in active if len(items) > r]
    return out


def _movielens(path: Path) -> list[dict]:
    out: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        header = [h.split(":")[0] for h in fh.readline().rstrip("\n").split("\t")]
        missing = {"user_id", "item_id", "timestamp"} - set(header)
        if missing:
            raise ValueError(f"{path}: header lacks {sorted(missing)} (got {header})")
        iu, ii, it = header.index("user_id"), header.index("item_id"), header.index("timestamp")
        ir = header.index("rating") if "rating" in header else None
        for line in fh:
            row = line.rstrip("\n").split("\t")
            if len(row) < len(header):
                continue
            ev = {"user_id": row[iu], "item_id": row[ii], "behavior": "rate", "ts": float(row[it])}
            if ir is not None:
                ev["props"] = {"rating": float(row[ir])}
            out.append(ev)
    return _by_time(out)


def _taobao(path: Path) -> list[dict]:
    out: list[dict] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) != 5:
                continue
            user, item, category, behavior, ts = row
            out.append(
                {
                    "user_id": user,
                    "item_id": item,
                    "behavior": TAOBAO_BEHAVIORS.get(behavior, behavior.lower()),
                    "ts": float(ts),
                    "props": {"category_id": category},
                }
            )
    return _by_time(out)


def _jsonl(path: Path) -> list[dict]:
    out: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object: {exc}") from None
    return _by_time(out)


_CSV_FIELDS = ("user_id", "item_id", "behavior", "ts")


def _csv(path: Path) -> list[dict]:
    out: list[dict] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(_CSV_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: header lacks {sorted(missing)} (got {reader.fieldnames})")
        for row in reader:
            ev: dict[str, Any] = {k: row[k] for k in _CSV_FIELDS}
            try:
                ev["ts"] = float(ev["ts"])
            except (TypeError, ValueError):
                pass  # ISO-8601 text stays text
            props = {}
            for k, v in row.items():
                if k in _CSV_FIELDS or v in (None, ""):
                    continue
                if k in ("event_id", "text"):
                    ev[k] = v
                else:
                    props[k] = v
            if props:
                ev["props"] = props
            out.append(ev)
    return _by_time(out)


_READERS: dict[str, Callable[[Path], list[dict]]] = {
    "amazon-seq": _amazon_seq,
    "movielens": _movielens,
    "taobao": _taobao,
    "jsonl": _jsonl,
    "csv": _csv,
}
FORMATS = tuple(_READERS)


def read_dataset(path: str | Path, fmt: str) -> Dataset:
    """Load ``path`` in format ``fmt`` (one of :data:`FORMATS`), sorted by timestamp."""
    path = Path(path)
    try:
        reader = _READERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
    t0 = time.perf_counter()
    events = reader(path)
    LOG.info(
        "read %d events from %s (%s) in %.2fs", len(events), path, fmt, time.perf_counter() - t0
    )
    return Dataset(path, fmt, events)
