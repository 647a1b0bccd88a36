"""The in-memory similar-user index: exact inner-product search over user embeddings.

:class:`UserIndex` wraps a FAISS ``IDMap2,Flat`` index (``IndexIDMap2`` over an
``IndexFlatIP``) keyed by the stable int64 user numbers that
:class:`userstream.stores.EmbeddingStore` assigns. Embeddings are
L2-normalized by the writer, so inner product is cosine similarity.

Flat search is exact: recall@10 against brute force is 1.0 by construction
(PROTOCOL.md section 3), which the tests check on seeded data.

A snapshot is ONE file, replaced atomically (temp file + fsync + ``os.replace``):
a magic line, a JSON line (last applied update-feed id, dimension, size), then
the FAISS index as ``faiss.serialize_index`` writes it. Index and feed id can
therefore never come from two different saves, even with several processes
saving to the same path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import faiss
import numpy as np

__all__ = ["UserIndex", "FACTORY"]

LOG = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"
_MAGIC = b"USERSTREAM-INDEX 1\n"


def _write_atomic(path: Path, *parts: bytes | np.ndarray) -> None:
    """Write ``parts`` to ``path`` through a temp file in the same directory + os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(memoryview(part))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class UserIndex:
    """Thread-safe FAISS inner-product index over int64 user numbers.

    The dimension may be left unknown (``dim=None``); it is fixed by the first
    :meth:`upsert`. Every method takes one lock, so a search never sees a
    half-applied upsert.

    >>> ix = UserIndex()
    >>> ix.upsert([7, 9], np.eye(2, dtype=np.float32))
    >>> scores, nums = ix.search(np.array([[1.0, 0.0]], dtype=np.float32), k=1)
    >>> int(nums[0, 0]), float(scores[0, 0])
    (7, 1.0)
    """

    def __init__(self, dim: int | None = None) -> None:
        self._lock = threading.Lock()
        self._index: faiss.IndexIDMap2 | None = None
        if dim is not None:
            self._index = self._new(dim)

    @staticmethod
    def _new(dim: int) -> faiss.IndexIDMap2:
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        return faiss.index_factory(dim, FACTORY, faiss.METRIC_INNER_PRODUCT)

    # --- properties ----------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """Vector dimension, None until the first vector arrived."""
        index = self._index
        return None if index is None else int(index.d)

    def __len__(self) -> int:
        index = self._index
        return 0 if index is None else int(index.ntotal)

    def __contains__(self, num: object) -> bool:
        return isinstance(num, (int, np.integer)) and self.reconstruct(int(num)) is not None

    # --- writes --------------------------------------------------------------
    def upsert(self, nums, vectors: np.ndarray) -> None:
        """Insert or replace the vectors of ``nums``: (N,) int64 ids, (N, D) float32.

        When an id occurs several times in one call, its last vector wins.
        """
        ids = np.ascontiguousarray(nums, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != ids.shape[0]:
            raise ValueError(f"expected ({ids.shape[0]}, D) vectors, got shape {vecs.shape}")
        if ids.size == 0:
            return
        if ids.size != np.unique(ids).size:  # keep the last occurrence of each id
            _, first_in_reversed = np.unique(ids[::-1], return_index=True)
            keep = np.sort(ids.size - 1 - first_in_reversed)
            ids, vecs = ids[keep], np.ascontiguousarray(vecs[keep])
        with self._lock:
            if self._index is None:
                self._index = self._new(vecs.shape[1])
            elif vecs.shape[1] != self._index.d:
                raise ValueError(
                    f"vector dimension {vecs.shape[1]} does not match the index ({self._index.d})"
                )
            self._index.remove_ids(ids)
            self._index.add_with_ids(vecs, ids)

    def delete(self, nums) -> int:
        """Remove ``nums`` from the index; returns how many were present."""
        ids = np.ascontiguousarray(nums, dtype=np.int64).reshape(-1)
        with self._lock:
            if self._index is None or ids.size == 0:
                return 0
            return int(self._index.remove_ids(ids))

    # --- reads ---------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best inner products per query: (scores (Q, k) float32, nums (Q, k) int64).

        Rows are sorted by descending score. Missing results (fewer than k
        vectors in the index) have num -1, as in FAISS.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        with self._lock:
            if self._index is None or self._index.ntotal == 0:
                return (
                    np.full((q.shape[0], k), -np.inf, dtype=np.float32),
                    np.full((q.shape[0], k), -1, dtype=np.int64),
                )
            if q.shape[1] != self._index.d:
                raise ValueError(
                    f"query dimension {q.shape[1]} does not match the index ({self._index.d})"
                )
            scores, nums = self._index.search(q, k)
        return scores, nums

    def reconstruct(self, num: int) -> np.ndarray | None:
        """The stored vector of ``num`` (a copy), or None when it is not in the index."""
        with self._lock:
            if self._index is None:
                return None
            try:
                return self._index.reconstruct(int(num))
            except RuntimeError:  # FAISS raises for an id it does not hold
                return None

    # --- snapshots -----------------------------------------------------------
    def save(self, path: str | os.PathLike, feed_id: str) -> None:
        """Write the index and the last applied ``feed_id`` to the snapshot file ``path``.

        The index is serialized to memory under the lock (a memcpy) and
        written to disk outside it, so searches wait only for the copy.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with self._lock:
            blob = None if self._index is None else faiss.serialize_index(self._index)
            dim = None if self._index is None else int(self._index.d)
            size = 0 if self._index is None else int(self._index.ntotal)
        meta = {"feed_id": feed_id, "dim": dim, "size": size}
        header = _MAGIC + json.dumps(meta).encode() + b"\n"
        _write_atomic(path, header, *(() if blob is None else (blob,)))
        LOG.info(
            "index snapshot: %d vectors, dim %s, feed id %s -> %s in %.3fs",
            size,
            dim,
            feed_id,
            path,
            time.perf_counter() - t0,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[UserIndex, str]:
        """Read a snapshot written by :meth:`save`: (index, last applied feed id).

        Raises FileNotFoundError when there is no snapshot and ValueError when
        it is unreadable or inconsistent.
        """
        path = Path(path)
        t0 = time.perf_counter()
        raw = path.read_bytes()
        if not raw.startswith(_MAGIC):
            raise ValueError(f"{path} is not a userstream index snapshot")
        meta_end = raw.find(b"\n", len(_MAGIC))
        try:
            meta = json.loads(raw[len(_MAGIC) : meta_end])
            feed_id, dim, size = str(meta["feed_id"]), meta["dim"], int(meta["size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} has an unreadable header: {exc}") from exc
        out = cls()
        if dim is not None:
            blob = np.frombuffer(raw, dtype=np.uint8, offset=meta_end + 1)
            try:
                index = faiss.deserialize_index(blob)
            except RuntimeError as exc:
                raise ValueError(f"{path} holds no readable FAISS index: {exc}") from exc
            if not isinstance(index, faiss.IndexIDMap2):
                raise ValueError(f"{path} holds a {type(index).__name__}, expected IndexIDMap2")
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise ValueError(f"{path} is not an inner-product index")
            if index.d != dim or index.ntotal != size:
                raise ValueError(
                    f"{path}: index has d={index.d}, n={index.ntotal}; header says {meta}"
                )
            out._index = index
        LOG.info(
            "index snapshot loaded: %d vectors, dim %s, feed id %s from %s in %.3fs",
            len(out),
            out.dim,
            feed_id,
            path,
            time.perf_counter() - t0,
        )
        return out, feed_id
