"""The next-item model behind ``/users/{id}/recommendations``, kept current.

:class:`Recommender` loads the newest checkpoint from ``settings.checkpoint_dir``
on first use and again whenever the model version in Redis
(:meth:`EmbeddingStore.model_info`) changes, so the API follows the training
worker without a restart. torch is imported on first use only: the rest of
the API does not need it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from userstream.stores import EmbeddingStore

if TYPE_CHECKING:
    from model.recommend import NextItemModel

__all__ = ["ModelNotReady", "Recommender"]

LOG = logging.getLogger(__name__)

_UNSET: Any = object()


class ModelNotReady(RuntimeError):
    """No checkpoint to rank with yet; the message says where it was looked for."""


class Recommender:
    def __init__(self, checkpoint_dir: Path | str, embeddings: EmbeddingStore) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.embeddings = embeddings
        self._lock = threading.Lock()
        self._model: NextItemModel | None = None
        self._seen_version: Any = _UNSET  # Redis model version the model was checked against

    def current(self) -> NextItemModel:
        """The model of the newest checkpoint; reloads when Redis's version moved.

        Raises :class:`ModelNotReady` before the first checkpoint exists.
        """
        info = self.embeddings.model_info()
        version = None if info is None else info.version
        with self._lock:
            if self._model is None or version != self._seen_version:
                self._refresh()
                self._seen_version = version
            return self._model  # type: ignore[return-value]  # _refresh raised otherwise

    def _refresh(self) -> None:
        from model.checkpoint import latest_checkpoint
        from model.recommend import NextItemModel

        for _ in range(3):  # the worker may prune the file between naming and reading it
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                break
            if self._model is not None and str(path) == self._model.path:
                return
            try:
                self._model = NextItemModel.load(path)
                return
            except FileNotFoundError:
                continue
        if self._model is None:
            raise ModelNotReady(
                f"no model checkpoint in {self.checkpoint_dir} yet: the training worker "
                "writes the first one after its first training cycle "
                "(or run `userstream train --out` into that folder)"
            )
