"""The training loop beside the model: vocabularies, optimizer, checkpoints.

:class:`Trainer` owns the encoder, its AdamW optimizer, the item and behavior
vocabularies and a version counter, all configured by one
:class:`~userstream.settings.ModelSettings` (live and offline alike).
``learn_many`` takes a few optimizer steps on minibatches of the sequences it
is given (growing the item table first when new items were admitted);
``expire_items`` and ``compact_items`` free the rows of items unseen for
``item_ttl_s`` and shrink the table when most of it is free (the live worker's
cycle calls them; :mod:`model.vocab` says how rows are reused); ``step``
is the one optimizer step every training loop takes; ``embed_many`` turns
sequences into L2-normalized user embeddings; ``save`` / ``load`` write and
restore everything a restarted worker needs (:mod:`model.checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.batching import make_batch
from model.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from model.encoder import EncoderConfig, SequenceEncoder
from model.tasks import LossWeights, total_loss
from model.vocab import BehaviorVocab, ItemVocab
from userstream.settings import ModelSettings
from userstream.types import Behavior

__all__ = ["EmbeddingModel", "Interrupted", "Trainer", "resolve_device"]

LOG = logging.getLogger(__name__)

INITIAL_ITEM_ROWS = 1024  # first allocation of the item table (grows on demand)
N_BEHAVIORS = 64  # behavior-type table rows (PAD, unknown, 62 names)
N_GAP_BUCKETS = 32  # log2 seconds: up to ~2**28 s between behaviors
GRAD_CLIP = 1.0
# compact_items runs when free rows exceed this many times the live items (and at
# least COMPACT_MIN_FREE): under steady churn free rows are reused, not compacted
COMPACT_FREE_RATIO = 2.0
COMPACT_MIN_FREE = 1024
# learning-rate multiplier of the profile table (EncoderConfig.profile_items): a
# linear softmax model trained by the item-bag task alone is far from converged at
# the encoder's rate within a profile run (docs/architecture.md, "Profiles")
PROFILE_LR_SCALE = 10.0


class Interrupted(RuntimeError):
    """``learn_many`` stopped between two optimizer steps because it was asked to.
    The weights hold the steps taken so far under the old version: reload the
    checkpoint (or simply exit) rather than keep training on them."""


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _grown_capacity(needed: int, current: int, cap: int) -> int:
    """Headroom: x1.5 or the next power of two, whichever is larger, capped."""
    pow2 = 1 << max(needed - 1, 1).bit_length()
    return min(cap, max(needed, int(current * 1.5), pow2))


def _param_groups(encoder: SequenceEncoder, lr: float) -> list[dict[str, Any]]:
    """The encoder's parameters for the optimizer: the profile table (if any) in
    a group of its own at ``PROFILE_LR_SCALE`` times ``lr``. Each group keeps
    its ``lr_scale`` so a reload can set the rate again."""
    rest, profile = encoder.split_parameters()
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "lr_scale": 1.0}]
    if profile:
        groups.append(
            {"params": profile, "lr": lr * PROFILE_LR_SCALE, "lr_scale": PROFILE_LR_SCALE}
        )
    return groups


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _swap_optimizer_param(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    rows: torch.Tensor | None = None,
) -> None:
    """Point the optimizer at ``new`` and zero-extend Adam moments to its shape;
    with ``rows`` (n,), new row j takes the moments of old row ``rows[j]``."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    for key in _MOMENTS:
        if key in state:
            moved = torch.zeros_like(new)  # (n_new, H)
            if rows is None:
                moved[: state[key].shape[0]] = state[key]  # learned rows keep their moments
            else:
                moved[: len(rows)] = state[key][rows.to(moved.device)]
            state[key] = moved
    optimizer.state[new] = state


def _reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], rows: torch.Tensor
) -> None:
    """Zero the Adam moments of ``rows`` of ``params``: a reused row starts as a
    new one does (the shared step count stays: it is per tensor, not per row)."""
    for p in params:
        state = optimizer.state.get(p)
        for key in _MOMENTS:
            if state and key in state:
                state[key][rows.to(state[key].device)] = 0.0


def encoder_config(settings: ModelSettings, n_items: int) -> EncoderConfig:
    """The encoder ``settings`` describe, with ``n_items`` rows in its item table."""
    return EncoderConfig(
        n_items=n_items,
        n_behaviors=N_BEHAVIORS,
        max_len=settings.max_len,
        hidden=settings.hidden_size,
        layers=settings.num_layers,
        heads=settings.num_heads,
        dropout=settings.dropout,
        attention_dropout=settings.attention_dropout,
        n_gap_buckets=N_GAP_BUCKETS,
        lowpass_alpha=settings.lowpass_alpha,
        lowpass_window=settings.lowpass_window,
        post_norm=settings.post_norm,
        positions=settings.positions,
        profile_items=settings.item_bag_weight > 0,  # the item-bag task trains its own table
    )


@torch.inference_mode()
def _embed(
    encoder: SequenceEncoder,
    items: ItemVocab,
    behaviors: BehaviorVocab,
    device: torch.device,
    batch_size: int,
    sequences: Sequence[Sequence[Behavior]],
) -> np.ndarray:
    encoder.eval()
    config = encoder.config
    out = np.zeros((len(sequences), config.hidden), dtype=np.float32)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        b = make_batch(chunk, items, behaviors, config.max_len, config.n_gap_buckets, trim=True).to(
            device
        )
        z = encoder.user_embedding(b.items, b.behaviors, b.gaps)  # (b, H)
        out[start : start + len(chunk)] = z.float().cpu().numpy()
    return out


@dataclass(frozen=True)
class EmbeddingModel:
    """Frozen weights and vocabularies of one version: :meth:`Trainer.snapshot`."""

    encoder: SequenceEncoder
    items: ItemVocab
    behaviors: BehaviorVocab
    device: torch.device
    batch_size: int
    version: int

    def embed_many(self, sequences: Sequence[Sequence[Behavior]]) -> np.ndarray:
        """What ``Trainer.embed_many`` gave at the snapshot's version."""
        return _embed(self.encoder, self.items, self.behaviors, self.device,
                      self.batch_size, sequences)  # fmt: skip


class Trainer:
    """Encoder + optimizer + vocabularies + version: one incremental learner."""

    def __init__(self, settings: ModelSettings, config: EncoderConfig | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.items = ItemVocab(settings.item_min_count, settings.item_capacity_max)
        self._set_expiry_policy()
        self.behaviors = BehaviorVocab(N_BEHAVIORS)
        if config is None:
            config = encoder_config(settings, min(INITIAL_ITEM_ROWS, self.items.max_rows))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.encoder = SequenceEncoder(config).to(self.device)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.encoder, settings.learning_rate),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        self.weights = LossWeights.of(settings)
        self.generator = torch.Generator().manual_seed(settings.seed)  # masks, sampling
        self.version = 0
        self.last_loss = math.nan
        self.extra: dict[str, Any] = {}  # caller state saved with the checkpoint
        # a moving average of the weights, updated after every step of learn_many;
        # :meth:`averaged` swaps it in for inference (not saved: a reload restarts it)
        self.average = None
        decay = getattr(settings, "average_decay", 0.0)
        if decay > 0:
            from model.offline.averaging import WeightAverage  # model.offline imports us

            self.average = WeightAverage(self.encoder, decay)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside the block the encoder holds the moving average of its weights
        (``average_decay``; the weights themselves without one)."""
        if self.average is None:
            yield
            return
        with self.average.applied(self.encoder):
            yield

    def _restart_average_rows(self, rows: torch.Tensor | None = None) -> None:
        """The average of the item tables follows their rows: all of them restart
        (``rows`` None: the table was remapped) or only ``rows`` (given to new items)."""
        if self.average is None:
            return
        for name, p in self.encoder.named_parameters():
            if not name.startswith(("item_emb.", "profile_emb.")):
                continue
            shadow = self.average.shadow.get(name)
            if rows is None or shadow is None or shadow.shape != p.shape:
                self.average.shadow[name] = p.detach().clone()
            else:
                shadow[rows.to(shadow.device)] = p.detach()[rows.to(p.device)]

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config

    def _set_expiry_policy(self) -> None:
        """The vocabulary's TTL and live cap come from the settings of this run,
        not from a checkpoint (a restart with a new ITEM_TTL_S applies it)."""
        self.items.ttl_s = self.settings.item_ttl_s or None
        self.items.live_max = self.settings.item_live_max or None

    # --- learning --------------------------------------------------------------
    def observe_many(self, sequences: Sequence[Sequence[Behavior]]) -> int:
        """Count the items and behaviors the encoder will read (the most recent
        ``max_len`` of each sequence) with their event times, admit items, and
        grow the item table with headroom when admitted items outgrow it.
        Learned rows and their AdamW moments are kept; new rows start with zero
        moments, and so do free rows handed to new items, re-initialized first.
        Returns # admitted."""
        T = self.config.max_len
        recent = [b for s in sequences for b in s[-T:]]
        admitted = self.items.observe_many([b.item_id for b in recent], [b.ts for b in recent])
        self.behaviors.observe_many(b.behavior for b in recent)
        needed, current = len(self.items), self.config.n_items
        if needed > current:
            new_capacity = _grown_capacity(needed, current, self.items.max_rows)
            for old, new in self.encoder.grow_items(new_capacity):
                _swap_optimizer_param(self.optimizer, old, new)
        reused = self.items.take_reused()
        if reused:
            rows = torch.tensor(reused, dtype=torch.long)
            self.encoder.reset_item_rows(rows, self.generator)
            tables = [t.weight for t in (self.encoder.item_emb, self.encoder.profile_emb)
                      if t is not None]  # fmt: skip
            _reset_optimizer_rows(self.optimizer, tables, rows)
            self._restart_average_rows(rows)
        return admitted

    def expire_items(self) -> int:
        """Free the rows of items unseen for ``item_ttl_s`` (event time) and of the
        least recently seen beyond ``item_live_max`` (:meth:`ItemVocab.expire`);
        returns how many. Their ids map to hash buckets from now on; the rows are
        re-initialized when a new item takes them (:meth:`observe_many`)."""
        return len(self.items.expire())

    def compact_items(self, force: bool = False) -> bool:
        """When most of the item table is free (free rows > ``COMPACT_FREE_RATIO``
        x live items, and at least ``COMPACT_MIN_FREE``), or with ``force``: move
        the live rows down over the free ones (weights and AdamW moments with
        them) and shrink the table to the rows in use plus growth headroom, so
        memory and checkpoints follow the live items, not their peak. Returns
        whether it ran. Rows move: the snapshot and checkpoint after it carry
        the new map, and nothing else keeps rows across calls."""
        v = self.items
        free, live = v.num_free, v.num_admitted
        many = free > COMPACT_FREE_RATIO * live and free >= COMPACT_MIN_FREE
        if not free or not (force or many):
            return False
        t0 = time.perf_counter()
        n_old = self.config.n_items
        kept = torch.from_numpy(v.compact())  # (live,) old rows, in their new order
        rows = torch.cat([torch.arange(v.first_item_row), kept])  # (first + live,)
        # the next power of two over the rows in use, at least the first allocation
        fitted = max(_grown_capacity(len(v), 0, v.max_rows), min(INITIAL_ITEM_ROWS, v.max_rows))
        capacity = min(n_old, fitted)  # >= len(v): both are
        for old, new in self.encoder.remap_items(rows, capacity):
            _swap_optimizer_param(self.optimizer, old, new, rows)
        self._restart_average_rows()
        LOG.info("item table compacted in %.3fs: %d free rows dropped, %d -> %d rows",
                 time.perf_counter() - t0, free, n_old, capacity)  # fmt: skip
        return True

    def item_stats(self) -> dict[str, int]:
        """What operators watch of the item table: items with a row now
        ("items_live"), free rows, rows allocated, items expired and free rows
        reused since the start of the run's checkpoints."""
        v = self.items
        return {
            "items_live": v.num_admitted,
            "item_rows_free": v.num_free,
            "item_rows": self.config.n_items,
            "items_expired_total": v.expired_total,
            "item_rows_reused_total": v.reused_total,
        }

    def learn_many(
        self,
        sequences: Sequence[Sequence[Behavior]],
        steps: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, float]:
        """Observe vocabularies, grow the item table, take ``steps`` optimizer steps.

        ``should_stop`` is asked before every step; when it says so, the method
        raises :class:`Interrupted` (the version does not change).

        Each step trains on ``train_batch_size`` sequences drawn at random
        without replacement. Empty sequences are ignored; if none is left,
        nothing happens and ``{}`` is returned (the version does not change).
        Returns mean losses over the steps ("loss", "mlm", "next",
        "contrastive") and "seconds".
        """
        seqs = [s for s in sequences if s]
        if not seqs or steps < 1:
            return {}
        t0 = time.perf_counter()
        self.observe_many(seqs)
        T = self.config.max_len
        window = getattr(self.settings, "train_window", 0)
        if window:
            T = min(T, window)  # a shorter training window: attention costs T squared
        n_valid = len(self.items)
        bs = min(self.settings.train_batch_size, len(seqs))
        self.encoder.train()
        sums: dict[str, float] = {}
        for step in range(steps):
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped after {step} of {steps} steps")
            pick = torch.randperm(len(seqs), generator=self.generator)[:bs].tolist()
            batch = make_batch(  # trimmed: short sequences cost what they hold
                [seqs[i] for i in pick],
                self.items,
                self.behaviors,
                T,
                self.config.n_gap_buckets,
                trim=True,
            ).to(self.device)
            loss, parts = total_loss(self.encoder, batch, n_valid, self.weights, self.generator)
            self.step(loss)
            if self.average is not None:
                self.average.update(self.encoder)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        self.version += 1
        out = {k: v / steps for k, v in sums.items()}
        out["seconds"] = time.perf_counter() - t0
        self.last_loss = out["loss"]
        LOG.info(
            "v%d: %d steps on %d sequences in %.3fs, loss %.4f (%s), %d item rows",
            self.version,
            steps,
            len(seqs),
            out["seconds"],
            out["loss"],
            ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k not in ("loss", "seconds")),
            n_valid,
        )
        return out

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``: backward, clip (``GRAD_CLIP``), AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.encoder.clip_gradients(GRAD_CLIP)
        self.optimizer.step()

    # --- inference -------------------------------------------------------------
    def embed_many(self, sequences: Sequence[Sequence[Behavior]]) -> np.ndarray:
        """(N, H) float32 L2-normalized user embeddings (zero rows for empty sequences)."""
        return _embed(self.encoder, self.items, self.behaviors, self.device,
                      self.settings.embed_batch_size, sequences)  # fmt: skip

    def snapshot(self, frozen: bool = True) -> EmbeddingModel:
        """The current weights and vocabularies for inference: a copy that later
        training does not touch (the embedder thread of the live worker reads it
        while the trainer keeps stepping), or, with ``frozen=False``, the live
        ones themselves (one thread: nothing trains while it embeds)."""
        if not frozen:
            return EmbeddingModel(self.encoder, self.items, self.behaviors, self.device,
                                  self.settings.embed_batch_size, self.version)  # fmt: skip
        encoder = copy.deepcopy(self.encoder).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        return EmbeddingModel(
            encoder, copy.deepcopy(self.items), copy.deepcopy(self.behaviors),
            self.device, self.settings.embed_batch_size, self.version,
        )  # fmt: skip

    # --- checkpoints -----------------------------------------------------------
    def save(
        self, folder: Path | str, keep: int = 3, extra: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the checkpoint of the current version into ``folder`` (keeping the
        newest ``keep``). ``extra`` (plain data: lists, dicts, numbers, strings)
        is stored too and comes back as ``Trainer.extra``."""
        if extra is not None:
            self.extra = dict(extra)
        ckpt = Checkpoint(
            version=self.version,
            config=self.config,
            model=self.encoder.state_dict(),
            items=self.items.state_dict(),
            behaviors=self.behaviors.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            last_loss=self.last_loss,
            extra=self.extra,
        )
        return write_checkpoint(folder, ckpt, keep)

    @classmethod
    def load(cls, path: Path | str, settings: ModelSettings) -> Trainer:
        """Restore a trainer from one checkpoint file (the checkpoint's architecture
        wins over ``settings``; learning rate and batch sizes come from ``settings``)."""
        t0 = time.perf_counter()
        ckpt = read_checkpoint(path)
        config = ckpt.config
        trainer = cls(settings, config=config)
        wanted = encoder_config(settings, config.n_items)  # what the settings describe
        for name in ("hidden", "layers", "heads", "max_len", "lowpass_alpha", "lowpass_window",
                     "post_norm", "positions", "profile_items"):  # fmt: skip
            ours = getattr(wanted, name)
            if getattr(config, name) != ours:
                LOG.warning("%s: checkpoint has %s=%s, settings say %s; using the checkpoint's",
                            path, name, getattr(config, name), ours)  # fmt: skip
        trainer.encoder.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            trainer.optimizer.load_state_dict(ckpt.optimizer)
        for group in trainer.optimizer.param_groups:
            group["lr"] = settings.learning_rate * group.get("lr_scale", 1.0)
        trainer.items, trainer.behaviors = ckpt.vocabularies()
        trainer._set_expiry_policy()
        if ckpt.generator is not None:
            trainer.generator.set_state(ckpt.generator)
        trainer.version = ckpt.version
        trainer.last_loss = ckpt.last_loss
        trainer.extra = dict(ckpt.extra)
        LOG.info("loaded %s (v%d) in %.3fs", path, trainer.version, time.perf_counter() - t0)
        return trainer
