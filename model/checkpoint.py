"""Checkpoint files: the one place that writes and reads the learner's state.

A checkpoint is ``ckpt-{version:08d}.pt`` (weights, encoder config, optimizer
state, vocabularies, RNG state, caller extras) plus a ``latest`` file naming
the newest one. Both are written to a temporary name, fsynced and
``os.replace``d (atomic on POSIX), so a reader never sees a half-written file.
:func:`read_checkpoint` checks the format, and everything that loads one (the
trainer, the API's ranking model, ``userstream export``) goes through it.

Formats: 2 (written since item expiry) adds to the item vocabulary each slot's
last-seen event time, free slots (None in ``items``), the stream clock and the
expiry counters. A reader of format 1 would take a free slot for an item named
"None", so format 1 code refuses these files; format 1 files are still read
(their items get an unknown last-seen time, stamped at the first expiry).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from model.encoder import EncoderConfig
from model.vocab import BehaviorVocab, ItemVocab

__all__ = ["FORMAT", "Checkpoint", "latest_checkpoint", "read_checkpoint", "write_checkpoint"]

LOG = logging.getLogger(__name__)

FORMAT = 2
READABLE = (1, 2)  # formats read_checkpoint accepts (see the module docstring)
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds."""

    version: int
    config: EncoderConfig
    model: dict[str, torch.Tensor]  # the encoder's state_dict
    items: dict[str, Any]  # ItemVocab.state_dict()
    behaviors: dict[str, Any]  # BehaviorVocab.state_dict()
    optimizer: dict[str, Any] | None = None
    generator: torch.Tensor | None = None  # the trainer's masks / sampling RNG
    last_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's plain data
    saved_at: float = 0.0
    path: Path | None = None  # where it was read from

    def vocabularies(self) -> tuple[ItemVocab, BehaviorVocab]:
        items = ItemVocab()
        items.load_state_dict(self.items)
        behaviors = BehaviorVocab(int(self.behaviors["capacity"]))
        behaviors.load_state_dict(self.behaviors)
        return items, behaviors


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_checkpoint(folder: Path | str, ckpt: Checkpoint, keep: int) -> Path:
    """Write ``ckpt`` as ``ckpt-{version:08d}.pt``, point ``latest`` at it and
    delete all but the newest ``keep`` checkpoint files."""
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": ckpt.version,
        "config": dataclasses.asdict(ckpt.config),
        "model": ckpt.model,
        "optimizer": ckpt.optimizer,
        "items": ckpt.items,
        "behaviors": ckpt.behaviors,
        "generator": ckpt.generator,
        "last_loss": ckpt.last_loss,
        "extra": ckpt.extra,
        "saved_at": ckpt.saved_at or time.time(),
    }
    name = f"ckpt-{ckpt.version:08d}.pt"
    path = folder / name
    _atomic_write(path, lambda f: torch.save(payload, f))
    _atomic_write(folder / "latest", lambda f: f.write(name.encode()))
    _prune(folder, keep, keep_name=name)
    LOG.info("checkpoint %s written in %.3fs (%.1f MB)", path, time.perf_counter() - t0,
             path.stat().st_size / 1e6)  # fmt: skip
    return path


def _prune(folder: Path, keep: int, keep_name: str) -> None:
    found = sorted(
        (int(m.group(1)), p.name) for p in folder.iterdir() if (m := _NAME.match(p.name))
    )
    for _, name in found[:-keep]:
        if name != keep_name:
            (folder / name).unlink(missing_ok=True)


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Load one checkpoint file (on the CPU); a file of another format is an error."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in READABLE:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path}: not a userstream checkpoint of format {' or '.join(map(str, READABLE))} "
            f"({found!r})"
        )
    return Checkpoint(
        version=int(payload["version"]),
        config=EncoderConfig(**payload["config"]),
        model=payload["model"],
        items=payload["items"],
        behaviors=payload["behaviors"],
        optimizer=payload.get("optimizer"),
        generator=payload.get("generator"),
        last_loss=float(payload.get("last_loss", float("nan"))),
        extra=dict(payload.get("extra") or {}),
        saved_at=float(payload.get("saved_at", 0.0)),
        path=Path(path),
    )


def latest_checkpoint(folder: Path | str) -> Path | None:
    """The file ``latest`` names, else the highest-numbered ``ckpt-*.pt``, else None.

    ``folder`` may also be a checkpoint file itself, which is returned as it is.
    """
    folder = Path(folder)
    if folder.is_file():
        return folder
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named.is_file():
            return named
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None
