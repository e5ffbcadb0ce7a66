"""Compressed search (IndexIVFPQ, inner product) re-ranked exactly from vectors on disk.

Memory holds only the coarse centroids and one ``m``-byte PQ code plus a few int64s per
vector. The full float32 vectors go to ``vectors.f32``, read through ``np.memmap``: a query
takes ``rerank * k`` candidates from the PQ scores and re-scores them exactly from that
file. The file is disk and page cache, not counted in ``memory_bytes``.

faiss stores each vector under its row in ``vectors.f32``; ``row_ids`` maps rows back to ids.
Removing deletes the codes from the inverted lists and tombstones the row (its id becomes
-1); the dead row stays in ``vectors.f32`` as disk space until the index is rebuilt.

Training needs data: until ``train_size`` vectors have been added (or ``train`` is called),
the index is untrained and answers exactly by scanning ``vectors.f32``. The add that reaches
``train_size`` trains the coarse quantiser and the PQ on a random sample of the rows so far
and encodes them, so adding in small batches works as well as adding everything at once.

Building from shards (``fill_from_shards``, what a rebuild uses): a collection too large for
memory as float32 arrives as a sequence of shards, each loaded only when asked for. A first
pass draws the training sample across all shards (seeded; the same rows ``train`` would pick
from the whole collection), the quantiser and PQ are trained once, and a second pass takes one
shard at a time: its floats are appended to ``vectors.f32`` and encoded into an IVF index of
its own, a copy of the trained, empty one (``encode_shard``), whose inverted lists are then
moved into this index with faiss's ``merge_from``, as autofaiss and faiss's on-disk demo build
per-shard indexes and merge them. Only one shard of floats, the training sample and the codes
(``m`` bytes and an id per vector) are ever in memory. ``encode_shard`` needs nothing but the
empty trained index and the shard, so shards can also be encoded elsewhere and merged here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..atomic import write_npy_atomic
from ..errors import ConfigError, InputError
from ..progress import progress_bar
from .base import VectorIndex, as_vectors, padding, top_k_indices
from .faiss_lib import faiss, read_index_file, write_index_file
from .idmap import SortedIds
from .npy import read_npy
from .vector_file import VectorFile

FAISS_FILE = "ivfpq.faiss"
ROW_IDS_FILE = "row_ids.npy"
VECTORS_FILE = "vectors.f32"
# faiss's k-means warns below 39 training points per centroid; we require that many.
MIN_POINTS_PER_CENTROID = 39
# The default sample: enough for stable centroids while keeping k-means to about a minute at
# nlist=4096 on two cores (faiss itself would subsample beyond 256 per centroid).
TRAIN_POINTS_PER_CENTROID = 64
# Re-ranking reads at least this many candidates, so a small k is not left to the PQ's
# coarse order (top-1 from 10 candidates misses far more often than from 64).
RERANK_MIN_CANDIDATES = 64
# Candidate vectors gathered at once while re-ranking (16 MiB of float32).
RERANK_BLOCK_FLOATS = 1 << 22
EXACT_SCAN_ROWS = 65536


def default_m(dim: int) -> int:
    """The largest divisor of ``dim`` that leaves at least 8 dimensions per sub-quantiser."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


class Shard(Protocol):
    """One slice of a collection, loaded only when asked for (``ids``, ``vectors``)."""

    def __len__(self) -> int: ...

    def load(self) -> tuple[np.ndarray, np.ndarray]: ...


def encode_shard(trained: object, rows: np.ndarray, vectors: np.ndarray) -> object:
    """The IVF-PQ codes of one shard: a copy of the trained, empty faiss index holding ``vectors``
    under ``rows``. Its inverted lists merge into any index sharing that training (``merge_from``)."""
    if trained.ntotal:
        raise ValueError("encode_shard needs the trained index while it is still empty")
    shard = faiss().clone_index(trained)
    shard.add_with_ids(vectors, rows)
    return shard


def shard_sample(shards: Sequence[Shard], size: int, seed: int = 0) -> np.ndarray:
    """``size`` rows drawn uniformly from all ``shards`` (in order, as one collection), loading one
    shard at a time; the rows ``IVFPQIndex.train`` would sample from the concatenation."""
    sizes = np.array([len(shard) for shard in shards], dtype=np.int64)
    total = int(sizes.sum())
    picked = np.arange(total) if total <= size else np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for shard, start, stop in zip(shards, bounds[:-1], bounds[1:]):
        rows = picked[np.searchsorted(picked, start):np.searchsorted(picked, stop)] - start
        if len(rows):
            _, vectors = shard.load()
            parts.append(np.array(vectors[rows], dtype=np.float32))
            del vectors
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` over the live rows of ``vectors``, scanned in blocks."""
    best_scores, best_ids = padding(len(queries), k)
    for start in range(0, len(vectors), EXACT_SCAN_ROWS):
        block_ids = row_ids[start:start + EXACT_SCAN_ROWS]
        scores = queries @ np.asarray(vectors[start:start + len(block_ids)]).T
        scores[:, block_ids < 0] = -np.inf
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(block_ids, (len(queries), len(block_ids)))], axis=1)
        keep = top_k_indices(scores, k)
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    best_ids[~np.isfinite(best_scores)] = -1
    return best_scores, best_ids


class IVFPQIndex(VectorIndex):
    """Inverted file over product-quantised codes, with exact re-ranking.

    Options: ``nlist`` coarse clusters; ``m`` sub-quantisers (bytes per code; must divide
    dim; default dim/8); ``nbits`` bits per sub-quantiser code; ``nprobe`` clusters visited
    per query; ``rerank`` candidates fetched per requested result (at least 64 in all) and
    re-scored exactly (0 returns the PQ scores as they are); ``train_size`` vectors sampled for training
    (default 64 per centroid). ``nprobe`` and ``rerank`` can change after building.
    """

    kind = "ivfpq"
    OPTION_DEFAULTS = {"nlist": 1024, "m": None, "nbits": 8, "nprobe": 32, "rerank": 20, "train_size": None}
    SEARCH_OPTIONS = frozenset({"nprobe", "rerank"})
    TRACKS_ROWS = True

    def __init__(self, dim: int, **options):
        super().__init__(dim, **options)
        module = faiss()
        # The PQ tables are rebuilt per query for inner product, so none are precomputed.
        self._quantizer = module.IndexFlatIP(self.dim)
        self._index = module.IndexIVFPQ(self._quantizer, self.dim, self.options["nlist"], self.options["m"],
                                        self.options["nbits"], module.METRIC_INNER_PRODUCT)
        self._row_ids = np.empty(0, dtype=np.int64)  # row of vectors.f32 -> id, -1 once removed
        self._vectors = VectorFile(self.dim)
        self._shard_template: object | None = None  # the trained, empty index, while fill_from_shards runs

    def _check_options(self, options: dict) -> None:
        if options["m"] is None:
            options["m"] = default_m(self.dim)
        nlist = self._positive_int(options, "nlist")
        m = self._positive_int(options, "m")
        if self.dim % m:
            raise ConfigError(f"ivfpq index: m={m} must divide the dimension {self.dim}")
        if not 1 <= self._positive_int(options, "nbits") <= 16:
            raise ConfigError("ivfpq index: nbits must be between 1 and 16")
        if options["train_size"] is None:
            options["train_size"] = TRAIN_POINTS_PER_CENTROID * self._centroids_to_train(options)
        if self._positive_int(options, "nprobe") > nlist:
            options["nprobe"] = nlist  # probing every cluster is the most there is
        self._positive_int(options, "rerank", 0)
        minimum = MIN_POINTS_PER_CENTROID * self._centroids_to_train(options)
        if self._positive_int(options, "train_size") < minimum:
            raise ConfigError(f"ivfpq index: train_size must be at least {minimum} "
                              f"({MIN_POINTS_PER_CENTROID} per centroid of the largest k-means)")

    @staticmethod
    def _centroids_to_train(options: dict) -> int:
        # The coarse k-means has nlist centroids, each PQ sub-quantiser 2**nbits.
        return max(int(options["nlist"]), 2 ** int(options["nbits"]))

    @staticmethod
    def estimate_memory_bytes(n_vectors: int, dim: int, nlist: int, m: int, nbits: int = 8) -> int:
        code_bytes = (m * nbits + 7) // 8
        # Per vector: its code and faiss id in an inverted list, the row -> id and sorted id tables.
        return n_vectors * (code_bytes + 8 + 8 + 16) + 4 * dim * (nlist + 2 ** nbits)

    # -- training ----------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, vectors: np.ndarray | None = None) -> None:
        """Train on ``vectors`` (a sample of ``train_size`` of them), or on the rows added so far.

        Rows added before training are encoded afterwards; later adds are encoded as they come.
        """
        self._check_writable()
        if self.is_trained:
            raise InputError("this ivfpq index is already trained")
        if vectors is None:
            live_rows = np.flatnonzero(self._row_ids >= 0)
            sample = self._vectors.take(self._sample(live_rows))
        else:
            sample = as_vectors(vectors, self.dim)
            sample = sample[np.sort(self._sample(np.arange(len(sample))))]
        minimum = MIN_POINTS_PER_CENTROID * self._centroids_to_train(self.options)
        if len(sample) < minimum:
            raise InputError(f"ivfpq training needs at least {minimum} vectors for nlist={self.options['nlist']} "
                             f"and nbits={self.options['nbits']}, got {len(sample)}: add more or lower nlist")
        self._index.train(sample)
        self._encode(np.flatnonzero(self._row_ids >= 0))

    def fill_from_shards(self, shards: Sequence[Shard], progress: bool = False) -> None:
        """Add every shard to this new, empty index, holding one shard of floats at a time.

        When the shards hold at least ``train_size`` vectors (and the index is untrained), it is
        first trained on a sample drawn across all of them; each shard is then encoded on its
        own and merged (see the module docstring). Fewer vectors than that are added as they
        are, untrained, exactly as ``add`` would.
        """
        self._check_writable()
        if len(self._row_ids):
            raise InputError("fill_from_shards builds a new index, and this ivfpq index already holds vectors")
        total = sum(len(shard) for shard in shards)
        if not self.is_trained and total >= self.options["train_size"]:
            self._index.train(shard_sample(shards, self.options["train_size"]))
        if self.is_trained:
            self._shard_template = faiss().clone_index(self._index)
        try:
            with progress_bar(total=total, desc="ivfpq: adding shards", unit="vec", disable=not progress) as bar:
                for shard in shards:
                    ids, vectors = shard.load()
                    self.add(ids, vectors)
                    bar.update(len(ids))
                    del ids, vectors  # the next shard replaces this one, never joins it
        finally:
            self._shard_template = None

    def _sample(self, rows: np.ndarray) -> np.ndarray:
        size = self.options["train_size"]
        if len(rows) <= size:
            return rows
        # Seeded so the same data always trains the same index.
        return np.sort(np.random.default_rng(0).choice(rows, size, replace=False))

    def _encode(self, rows: np.ndarray) -> None:
        for start in range(0, len(rows), EXACT_SCAN_ROWS * 4):
            block = rows[start:start + EXACT_SCAN_ROWS * 4]
            self._index.add_with_ids(self._vectors.take(block), block)

    # -- the operations ----------------------------------------------------------------------
    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        first = len(self._row_ids)
        rows = np.arange(first, first + len(ids), dtype=np.int64)
        self._vectors.append(vectors)
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._live.insert(ids, rows)
        if self._shard_template is not None:
            self._index.merge_from(encode_shard(self._shard_template, rows, vectors), 0)
        elif self.is_trained:
            self._index.add_with_ids(vectors, rows)
        elif len(self._live) >= self.options["train_size"]:
            self.train()

    def _remove(self, ids: np.ndarray) -> None:
        rows = self._live.discard(ids)
        if self.is_trained:
            self._index.remove_ids(rows)
        self._row_ids[rows] = -1

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.is_trained:
            return exact_top_k(queries, self._vectors.view(), self._row_ids, k)
        module = faiss()
        params = module.SearchParametersIVF()
        params.nprobe = self.options["nprobe"]
        rerank = self.options["rerank"]
        candidates = max(k * rerank, RERANK_MIN_CANDIDATES) if rerank else k
        scores, rows = self._index.search(queries, candidates, params=params)
        if rerank:
            scores, rows = self._rerank(queries, rows, k)
        return scores, np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidate rows, read from the vector file; keep the best ``k``."""
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        out_rows = np.empty((len(queries), k), dtype=np.int64)
        chunk = max(1, RERANK_BLOCK_FLOATS // (rows.shape[1] * self.dim))
        for start in range(0, len(queries), chunk):
            block = rows[start:start + chunk]
            valid = block >= 0
            vectors = np.zeros(block.shape + (self.dim,), dtype=np.float32)
            vectors[valid] = self._vectors.take(block[valid])
            scores = np.einsum("qcd,qd->qc", vectors, queries[start:start + len(block)])
            scores[~valid] = -np.inf
            keep = top_k_indices(scores, k)
            out_scores[start:start + len(block)] = np.take_along_axis(scores, keep, axis=1)
            out_rows[start:start + len(block)] = np.take_along_axis(block, keep, axis=1)
        return out_scores, out_rows

    def memory_bytes(self) -> int:
        index = self._index
        lists = 0 if self.read_only else index.ntotal * (index.code_size + 8)  # mapped after load(mmap=True)
        quantizer = 4 * self.dim * self.options["nlist"]
        pq = 4 * index.pq.centroids.size() + 4 * index.precomputed_table.size()
        return lists + quantizer + pq + self._row_ids.nbytes + self._live.nbytes

    # -- persistence -------------------------------------------------------------------------
    def _save_files(self, folder: Path) -> None:
        self._vectors.save(folder / VECTORS_FILE)
        write_index_file(self._index, folder / FAISS_FILE)
        write_npy_atomic(folder / ROW_IDS_FILE, self._row_ids)

    def _load_files(self, folder: Path, mmap: bool) -> None:
        module = faiss()
        index = read_index_file(folder / FAISS_FILE, module.IO_FLAG_MMAP if mmap else 0)
        if not isinstance(index, module.IndexIVFPQ) or index.d != self.dim or index.nlist != self.options["nlist"]:
            raise ValueError(f"{FAISS_FILE} is not a {self.dim}-d IndexIVFPQ with nlist={self.options['nlist']}")
        row_ids = read_npy(folder / ROW_IDS_FILE, np.int64)
        vectors = VectorFile(self.dim, folder / VECTORS_FILE)
        if len(vectors) != len(row_ids):
            raise ValueError(f"{VECTORS_FILE} has {len(vectors)} rows, {ROW_IDS_FILE} {len(row_ids)}")
        live_rows = np.flatnonzero(row_ids >= 0)
        if index.is_trained and index.ntotal != len(live_rows):
            raise ValueError(f"{FAISS_FILE} holds {index.ntotal} codes for {len(live_rows)} live rows")
        self._vectors.close()
        self._index, self._quantizer = index, None  # a read index owns its quantiser
        self._row_ids = row_ids
        self._vectors = vectors
        self._live = SortedIds.from_arrays(row_ids[live_rows], live_rows)
