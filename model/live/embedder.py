"""The embedder: changed users re-embedded with the newest weights within a
moment of their event, whatever a training cycle costs.

Every applied event marks its user in the "embed" change queue
(:meth:`SequenceStore.take_dirty` with ``queue="embed"``). :meth:`Embedder.run_once`
claims up to ``embed_claim_max`` of them, reads their sequences *after* the
claim (an event applied later marks the user again), embeds them with the
current :class:`~model.trainer.EmbeddingModel` (inference only) and upserts
them with the ts of the newest behavior each saw; then it releases the claim.
A crash leaves the claim behind and the next start puts it back, so no change
goes unembedded.

The training worker hands over each new version with :meth:`publish`, together
with the users to re-embed with it (the cycle's users and a round-robin
refresh of the others). They fill what the changed users leave of each batch,
and at least a quarter of it (``REFRESH_SHARE``) once the longest-waiting change
has waited more than ``BACKLOG_S`` (a standing backlog, as in a bulk load, must
not starve them; while changes are embedded within that, they keep the whole
batch), and the version's
:class:`ModelInfo` is written once they all are: the ``model_version`` the API
reports is a version whose refresh is done.

The embedder is the only writer of embeddings: two writers could let an older
read of a sequence overwrite a newer one.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Iterable, Sequence

from model.live.metrics import TrainMetrics
from model.trainer import EmbeddingModel
from userstream.settings import Settings
from userstream.stores import EmbeddingStore, ModelInfo, SequenceStore

__all__ = ["Embedder"]

LOG = logging.getLogger(__name__)

ERROR_BACKOFF_S = 1.0
REFRESH_SHARE = 0.25  # of a batch kept for a pending refresh under a standing backlog
BACKLOG_S = 30.0  # a change waiting longer than this: freshness is lost to a backlog anyway


class Embedder:
    """Embeds changed users (first) and a published version's refresh (after)."""

    def __init__(
        self,
        settings: Settings,
        sequences: SequenceStore,
        embeddings: EmbeddingStore,
        model: EmbeddingModel,
        metrics: TrainMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or TrainMetrics()  # the worker passes its own
        self.sequences = sequences
        self.embeddings = embeddings
        self._model = model
        self._lock = threading.Lock()  # guards _model, _refresh and _pending
        self._refresh: dict[str, None] = {}  # users to re-embed with the newest version
        self._pending: ModelInfo | None = None  # written once the refresh is done
        self.embedded_changed = 0  # users embedded because they changed
        self.embedded_refresh = 0  # users re-embedded because the weights changed
        self.failures = 0  # batches that raised in run_forever
        self.batches = 0
        self._thread: threading.Thread | None = None

    def publish(
        self, model: EmbeddingModel, info: ModelInfo | None, refresh: Iterable[str] = ()
    ) -> None:
        """Embed with ``model`` from the next batch on; re-embed ``refresh`` with it,
        then write ``info`` (None: write nothing)."""
        with self._lock:
            self._model = model
            self._refresh.update(dict.fromkeys(refresh))
            self._pending = info

    def forget_many(self, user_ids: Iterable[str]) -> None:
        """Forgotten users leave the pending refresh."""
        with self._lock:
            for u in user_ids:
                self._refresh.pop(u, None)

    # --- work ------------------------------------------------------------------
    def run_once(self) -> int:
        """One batch: changed users first, the rest of the batch from the refresh
        (under a standing backlog at least ``REFRESH_SHARE`` of ``embed_claim_max``).
        Returns the users embedded (0: nothing to do)."""
        model = self._model
        room = self.settings.embed_claim_max
        users = self.sequences.take_dirty(room, queue="embed")
        n = 0
        if users:
            try:
                n = self._embed(users, model, "changed")
            except BaseException:
                self.sequences.mark_dirty(users, queue="embed")
                self.sequences.release_claimed(users, queue="embed")
                raise
            self.sequences.release_claimed(users, queue="embed")
            self.embedded_changed += n
        # while changes are embedded within BACKLOG_S they keep the whole batch
        backlog = bool(self._refresh) and self.sequences.oldest_change_age_s() > BACKLOG_S
        with self._lock:
            if model is self._model:  # just embedded with the newest weights
                for u in users:
                    self._refresh.pop(u, None)
            # what the changed users left of the batch; under a standing backlog
            # (a bulk load) never less than a share of it, so a new version still
            # gets its refresh done and published
            take = room - len(users)
            if backlog:
                take = max(take, math.ceil(REFRESH_SHARE * room))
            chunk = list(itertools.islice(self._refresh, take))
            for u in chunk:
                del self._refresh[u]
        if chunk:
            try:
                m = self._embed(chunk, model, "refresh")
            except BaseException:
                with self._lock:  # best effort, but not lost to a Redis hiccup
                    self._refresh.update(dict.fromkeys(chunk))
                raise
            self.embedded_refresh += m
            n += m
        self._publish_info(model)
        if n:
            self.batches += 1
            if self.batches % 200 == 0:
                LOG.info("embedder: %d batches, %d changed + %d refreshed users (v%d)",
                         self.batches, self.embedded_changed, self.embedded_refresh,
                         model.version)  # fmt: skip
        return n

    def _publish_info(self, model: EmbeddingModel) -> None:
        with self._lock:
            info = self._pending
            if info is None or self._refresh or model.version < info.version:
                return
            self._pending = None
        self.embeddings.set_model_info(info)

    def _embed(self, users: Sequence[str], model: EmbeddingModel, reason: str) -> int:
        seqs = self.sequences.read_many(users)
        pairs = [(u, q) for u, q in zip(users, seqs, strict=True) if q]
        if not pairs:
            return 0
        vectors = model.embed_many([q for _, q in pairs])
        newest = [max(b.ts for b in q) for _, q in pairs]
        self.embeddings.upsert([u for u, _ in pairs], vectors, model.version, newest)
        self.metrics.observe_embedded(reason, newest)  # freshness: of changed users only
        return len(pairs)

    def drain(self) -> int:
        """Run batches until nothing is left (the one-thread mode: tests, the
        prequential loop). Returns the users embedded."""
        total = 0
        while n := self.run_once():
            total += n
        return total

    # --- thread ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, stop: threading.Event) -> None:
        """Run :meth:`run_forever` in a daemon thread until ``stop`` is set."""
        self._thread = threading.Thread(
            target=self.run_forever, args=(stop,), name="embedder", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run_forever(self, stop: threading.Event) -> None:
        """Batches until ``stop``; polls every ``embed_poll_s`` when idle. Claims
        left by a crash go back first, and again after a failed batch."""
        requeue = True
        while not stop.is_set():
            self.metrics.beat("embedder")
            try:
                if requeue:
                    n = self.sequences.requeue_claimed(queue="embed")
                    if n:
                        LOG.warning(
                            "%d users claimed by an unfinished embedding are stale again", n
                        )
                    requeue = False
                if self.run_once():
                    continue
            except Exception:
                LOG.exception("embedding batch failed; retrying in %.0fs", ERROR_BACKOFF_S)
                self.failures += 1
                self.metrics.embed_failures.inc()
                requeue = True
                stop.wait(ERROR_BACKOFF_S)
                continue
            stop.wait(self.settings.embed_poll_s)
