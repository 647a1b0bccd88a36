"""The in-memory similar-user index: inner-product search over user embeddings.

:class:`UserIndex` keys vectors by the stable int64 user numbers that
:class:`userstream.stores.EmbeddingStore` assigns. Embeddings are
L2-normalized by the writer, so inner product is cosine similarity. Below
``ivf_min`` vectors the index is a FAISS ``IDMap2,Flat`` (exact: recall@10
against brute force is 1.0 by construction); from there on an ``IndexIVFFlat``
with a hash-table id map (upserts and deletes by id in O(batch)), searching
``nprobe`` of ``nlist`` lists: recall below 1, measured by ``userstream bench
query`` and checked by the tests on seeded data.

A snapshot is ONE file, replaced atomically (temp file + fsync + ``os.replace``):
a magic line, a JSON line (last applied update-feed id, dimension, size), then
the FAISS index as ``faiss.serialize_index`` writes it. Index and feed id can
therefore never come from two different saves, even with several processes
saving to the same path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

__all__ = ["FACTORY", "IVF_MIN", "IndexBusy", "UserIndex"]

LOG = logging.getLogger(__name__)

FACTORY = "IDMap2,Flat"
IVF_MIN = 200_000  # vectors from which the index is an IVF one (exact below)
IVF_NLIST = 8192  # the most lists: 4 sqrt(n) (a power of two) up to this
IVF_NPROBE = 32


def nlist_for(n: int, most: int = IVF_NLIST) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest 4 sqrt(n), at most
    ``most`` and at most one list per 39 vectors (FAISS's training minimum).

    >>> nlist_for(200_000), nlist_for(1_000_000), nlist_for(1_000_000, most=1024)
    (2048, 4096, 1024)
    """
    ideal = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(most, ideal, n // 39))


def _use_threads(n: int) -> None:
    """OpenMP threads for FAISS calls of the calling thread (the setting is per
    thread; 0 leaves FAISS's default, one per core)."""
    if n and faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


def _remove(index: faiss.Index, ids: np.ndarray) -> int:
    if isinstance(index, faiss.IndexIVF):  # the hash-table id map takes an id array
        return int(index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
    return int(index.remove_ids(ids))


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


class IndexBusy(RuntimeError):
    """A read that may not wait found a writer holding (or waiting for) the index."""


class _ReadWriteLock:
    """Many readers at once, one writer alone; a waiting writer holds back new
    readers (so a steady query load cannot starve upserts)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self, wait: bool = True):
        """Share the index; with ``wait=False`` raise :class:`IndexBusy` instead of
        waiting for a writer (the mutex itself is only ever held for a moment)."""
        with self._cond:
            while self._writer or self._waiting:
                if not wait:
                    raise IndexBusy("the index is being written")
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _flat(dim: int) -> faiss.Index:
    if dim < 1:
        raise ValueError(f"dimension must be positive, got {dim}")
    return faiss.index_factory(dim, FACTORY, faiss.METRIC_INNER_PRODUCT)


def _ivf(vectors: np.ndarray, nlist: int, nprobe: int, seed: int = 0) -> faiss.IndexIVFFlat:
    """An empty IVF index with ``nlist`` lists trained on ``vectors`` (a sample of
    at most 32 per list), a hash-table id map (O(1) removal by id)."""
    d = vectors.shape[1]
    rng = np.random.default_rng(seed)
    n_train = min(len(vectors), 32 * nlist)
    sample = vectors[rng.choice(len(vectors), n_train, replace=False)]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10
    ivf.cp.min_points_per_centroid = 1  # a sample of 32 per list is enough here
    ivf.train(np.ascontiguousarray(sample))
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    ivf.nprobe = nprobe
    return ivf


def _contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of an IDMap2,Flat or a hash-mapped IVF index."""
    if isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vecs = index.index.reconstruct_n(0, index.ntotal) if len(ids) else None
        return ids, vecs if vecs is not None else np.zeros((0, index.d), np.float32)
    invlists = index.invlists
    ids_parts, vec_parts = [], []
    for lst in range(index.nlist):
        n = invlists.list_size(lst)
        if n:
            ids_parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * index.code_size)
            vec_parts.append(np.frombuffer(codes.copy(), dtype=np.float32).reshape(n, index.d))
    if not ids_parts:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    return np.concatenate(ids_parts).astype(np.int64), np.concatenate(vec_parts)


class UserIndex:
    """Thread-safe FAISS inner-product index over int64 user numbers, chosen by size.

    Below ``ivf_min`` vectors it is exact (``IDMap2,Flat``); once it holds that
    many it becomes an inverted-file index (``IndexIVFFlat``, :func:`nlist_for`
    lists, at most ``nlist``, trained on the vectors it holds, ``nprobe`` of
    them searched per query, a hash-table id map so an upsert or a delete costs
    O(batch), not O(index)); each time it grows about 4x past the size its lists
    were trained for, a new IVF index is trained (a search scans ~4x fewer
    vectors than the old lists would make it). Each new index is built beside
    the serving one and swapped in with the writes that happened meanwhile, so
    queries never wait for the training.

    Searches run concurrently (FAISS releases the GIL; a reader-writer lock lets
    them share the index); an upsert or delete takes the index alone for the
    time of the batch. The dimension may be left unknown (``dim=None``); the
    first :meth:`upsert` fixes it.

    >>> ix = UserIndex()
    >>> ix.upsert([7, 9], np.eye(2, dtype=np.float32))
    >>> scores, nums = ix.search(np.array([[1.0, 0.0]], dtype=np.float32), k=1)
    >>> int(nums[0, 0]), float(scores[0, 0])
    (7, 1.0)
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        ivf_min: int = IVF_MIN,
        nlist: int = IVF_NLIST,
        nprobe: int = IVF_NPROBE,
        threads: int = 1,
    ) -> None:
        self._lock = _ReadWriteLock()
        self.threads = threads  # OpenMP threads of a search and of a background build
        self._switch = threading.Lock()  # one switch to IVF at a time
        self._index: faiss.Index | None = None
        self.ivf_min, self.nlist, self.nprobe = ivf_min, nlist, nprobe
        self._log: list[tuple[np.ndarray, np.ndarray | None]] | None = None  # during a switch
        self._switching: threading.Thread | None = None
        if dim is not None:
            self._index = _flat(dim)

    @classmethod
    def build(cls, nums, vectors: np.ndarray, **options) -> UserIndex:
        """An index holding ``vectors`` under ``nums``, of the kind their number
        calls for (an IVF one is trained here, not in the background)."""
        out = cls(**options)
        ids = np.ascontiguousarray(nums, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) >= out.ivf_min:
            ivf = _ivf(vecs, nlist_for(len(ids), out.nlist), out.nprobe)
            ivf.add_with_ids(vecs, ids)
            out._index = ivf
        elif len(ids):
            out.upsert(ids, vecs)
        return out

    # --- properties ----------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """Vector dimension, None until the first vector arrived."""
        index = self._index
        return None if index is None else int(index.d)

    @property
    def kind(self) -> str:
        """ "flat" (exact) or "ivf"."""
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        index = self._index
        return 0 if index is None else int(index.ntotal)

    @property
    def scan_size(self) -> int:
        """About how many vectors one search compares the query with: all of them
        (exact), or the lists' centroids and ``nprobe`` average lists (IVF)."""
        index = self._index
        if index is None:
            return 0
        if isinstance(index, faiss.IndexIVF):
            return int(index.nlist + index.ntotal * min(index.nprobe, index.nlist) / index.nlist)
        return int(index.ntotal)

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
        with self._lock.write():
            if self._index is None:
                self._index = _flat(vecs.shape[1])
            elif vecs.shape[1] != self._index.d:
                raise ValueError(
                    f"vector dimension {vecs.shape[1]} does not match the index ({self._index.d})"
                )
            _remove(self._index, ids)
            self._index.add_with_ids(vecs, ids)
            if self._log is not None:
                self._log.append((ids, vecs))
            due = self._due(self._index)
        if due:
            self._start_switch()

    def _due(self, index: faiss.Index) -> bool:
        """Time for a (new) IVF index: the flat one reached ``ivf_min``, or the IVF
        one has grown about 4x past the size its lists were trained for."""
        if not isinstance(index, faiss.IndexIVF):
            return index.ntotal >= self.ivf_min
        return nlist_for(index.ntotal, self.nlist) >= 2 * index.nlist

    def delete(self, nums) -> int:
        """Remove ``nums`` from the index; returns how many were present."""
        ids = np.ascontiguousarray(nums, dtype=np.int64).reshape(-1)
        with self._lock.write():
            if self._index is None or ids.size == 0:
                return 0
            if self._log is not None:
                self._log.append((ids, None))
            return _remove(self._index, ids)

    def _start_switch(self) -> None:
        with self._switch:
            if self._switching is not None:
                return
            self._switching = threading.Thread(target=self._to_ivf, name="index-ivf", daemon=True)
            self._switching.start()

    def _to_ivf(self) -> None:
        """Build an IVF index from a copy of the serving one (flat, or an IVF one
        that outgrew its lists), replay the writes made meanwhile, swap it in."""
        try:
            self._rebuild()
        except Exception:  # the serving index stays; the next due write tries again
            LOG.exception("index: building the IVF index failed; the current one keeps serving")
            with self._lock.write():
                self._log = None
        finally:
            with self._switch:
                self._switching = None

    def _rebuild(self) -> None:
        _use_threads(self.threads)  # in the background: leave the cores to the searches
        t0 = time.perf_counter()
        with self._lock.read():
            ids, vecs = _contents(self._index)
            self._log = []  # set under the read lock: every later write is logged
        ivf = _ivf(vecs, nlist_for(len(ids), self.nlist), self.nprobe)
        ivf.add_with_ids(vecs, ids)
        t_built = time.perf_counter() - t0
        with self._lock.write():
            for log_ids, log_vecs in self._log:
                _remove(ivf, log_ids)
                if log_vecs is not None:
                    ivf.add_with_ids(log_vecs, log_ids)
            replayed = len(self._log)
            self._index, self._log = ivf, None
        LOG.info("index: %d vectors in a new IVF index (%d lists, nprobe %d) in %.1fs, %d writes "
                 "replayed", len(ids), ivf.nlist, ivf.nprobe, t_built, replayed)  # fmt: skip

    def wait_switch(self, timeout_s: float | None = None) -> None:
        """Wait for a running switch to IVF (tests, benchmarks)."""
        thread = self._switching
        if thread is not None:
            thread.join(timeout_s)

    # --- reads ---------------------------------------------------------------
    def search(
        self, vectors: np.ndarray, k: int, *, wait: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best inner products per query: (scores (Q, k) float32, nums (Q, k) int64).

        Rows are sorted by descending score. Missing results (fewer than k
        vectors in the index) have num -1, as in FAISS. ``wait=False``: raise
        :class:`IndexBusy` rather than wait while a write holds the index.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        _use_threads(self.threads)
        with self._lock.read(wait):
            index = self._index
            if index is None or index.ntotal == 0:
                return (
                    np.full((q.shape[0], k), -np.inf, dtype=np.float32),
                    np.full((q.shape[0], k), -1, dtype=np.int64),
                )
            if q.shape[1] != index.d:
                raise ValueError(
                    f"query dimension {q.shape[1]} does not match the index ({index.d})"
                )
            scores, nums = index.search(q, k)
        return scores, nums

    def reconstruct(self, num: int, *, wait: bool = True) -> np.ndarray | None:
        """The stored vector of ``num`` (a copy), or None when it is not in the index.
        ``wait=False`` as in :meth:`search`."""
        with self._lock.read(wait):
            if self._index is None:
                return None
            try:
                return self._index.reconstruct(int(num))
            except RuntimeError:  # FAISS raises for an id it does not hold
                return None

    # --- snapshots -----------------------------------------------------------
    def save(self, path: str | os.PathLike, feed_id: str, extra: bytes = b"") -> None:
        """Write the index and the last applied ``feed_id`` to the snapshot file ``path``,
        with ``extra`` bytes of the caller's (read back by :meth:`read_snapshot`).

        The index is serialized to memory under the lock (a memcpy) and
        written to disk outside it, so searches wait only for the copy.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with self._lock.read():
            blob = None if self._index is None else faiss.serialize_index(self._index)
            dim = None if self._index is None else int(self._index.d)
            size = 0 if self._index is None else int(self._index.ntotal)
        n_blob = 0 if blob is None else int(blob.nbytes)
        meta = {"feed_id": feed_id, "dim": dim, "size": size, "index_bytes": n_blob,
                "extra_bytes": len(extra)}  # fmt: skip
        header = _MAGIC + json.dumps(meta).encode() + b"\n"
        _write_atomic(path, header, *(() if blob is None else (blob,)), extra)
        LOG.info(
            "index snapshot: %d vectors, dim %s, feed id %s -> %s in %.3fs",
            size,
            dim,
            feed_id,
            path,
            time.perf_counter() - t0,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, **kw) -> tuple[UserIndex, str]:
        """(index, last applied feed id) of a snapshot (see :meth:`read_snapshot`)."""
        index, feed_id, _extra = cls.read_snapshot(path, **kw)
        return index, feed_id

    @classmethod
    def read_snapshot(cls, path: str | os.PathLike, **kw) -> tuple[UserIndex, str, bytes]:
        """Read a snapshot written by :meth:`save`: (index, last applied feed id,
        the caller's extra bytes).

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
        out = cls(**kw)
        start = meta_end + 1
        n_blob = int(meta.get("index_bytes", len(raw) - start))  # older snapshots: all of it
        extra = raw[start + n_blob :] if "extra_bytes" in meta else b""
        if len(extra) != int(meta.get("extra_bytes", 0)):
            raise ValueError(f"{path} is truncated: {len(extra)} of {meta['extra_bytes']} bytes")
        if dim is not None:
            blob = np.frombuffer(raw, dtype=np.uint8, offset=start, count=n_blob)
            try:
                index = faiss.deserialize_index(blob)
            except RuntimeError as exc:
                raise ValueError(f"{path} holds no readable FAISS index: {exc}") from exc
            if isinstance(index, faiss.IndexIVF):
                if index.direct_map.type != faiss.DirectMap.Hashtable:
                    raise ValueError(f"{path} holds an IVF index without a hash-table id map")
            elif not isinstance(index, faiss.IndexIDMap2):
                raise ValueError(
                    f"{path} holds a {type(index).__name__}, expected IndexIDMap2 or IndexIVFFlat"
                )
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise ValueError(f"{path} is not an inner-product index")
            if index.d != dim or index.ntotal != size:
                raise ValueError(
                    f"{path}: index has d={index.d}, n={index.ntotal}; header says {meta}"
                )
            if isinstance(index, faiss.IndexIVF):
                index.nprobe = out.nprobe
            out._index = index
        LOG.info(
            "index snapshot loaded: %d vectors, dim %s, feed id %s from %s in %.3fs",
            len(out),
            out.dim,
            feed_id,
            path,
            time.perf_counter() - t0,
        )
        return out, feed_id, extra
