"""The vector-index API: ``create_index``, ``load_index``, ``choose_index_type`` and the kinds.

Every index stores L2-normalised float32 vectors under int64 ids and scores by inner
product (cosine similarity). Kinds are plugins (``register_index_backends``); the built-in
``flat``, ``hnsw`` and ``ivfpq`` are registered by ``mmretrieve.default_plugins.index_backends``.
faiss uses its own OpenMP thread count (``faiss.omp_set_num_threads``); nothing here sets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..specs import resolve_factory
from .base import VectorIndex, read_meta

__all__ = ["VectorIndex", "FlatIndex", "HNSWIndex", "IVFPQIndex", "create_index", "build_index", "load_index",
           "choose_index_type", "ArrayShard", "Shard"]

# The kinds and ``auto`` are imported when first named: a search loads its index's kind only
# (a flat index never imports the HNSW or IVF-PQ modules, nor the progress bar IVF-PQ trains with).
_LAZY = {"FlatIndex": ".flat", "HNSWIndex": ".hnsw", "IVFPQIndex": ".ivfpq", "Shard": ".ivfpq",
         "choose_index_type": ".choose"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __package__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry():
    from ..plugins import get_host

    return get_host().registry("index_backend")


def create_index(kind: str, dim: int, **options: Any) -> VectorIndex:
    """A new, empty index of a registered kind; an unknown kind raises UnknownNameError."""
    return _registry().get(kind).build(dim=dim, **options)


# A rebuild reads the stored embeddings in shards of about this many bytes of float32.
SHARD_BYTES = 64 << 20


def shard_rows(dim: int) -> int:
    """Rows per shard of ``dim``-d float32 vectors: ``SHARD_BYTES`` worth, at least 1,024."""
    return max(1024, SHARD_BYTES // (4 * dim))


@dataclass(frozen=True)
class ArrayShard:
    """Rows ``start:stop`` of ``ids`` and ``vectors`` (arrays, or ``np.load(..., mmap_mode="r")``
    maps, whose rows are read from disk only by ``load``)."""

    ids: np.ndarray
    vectors: np.ndarray
    start: int = 0
    stop: int | None = None

    def __len__(self) -> int:
        return len(range(*slice(self.start, self.stop).indices(len(self.ids))))

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(self.start, self.stop)
        return np.array(self.ids[rows], dtype=np.int64), np.array(self.vectors[rows], dtype=np.float32)

    @classmethod
    def split(cls, ids: np.ndarray, vectors: np.ndarray, rows: int) -> list["ArrayShard"]:
        """``ids`` and ``vectors`` cut into shards of ``rows`` rows (the last one shorter)."""
        return [cls(ids, vectors, start, min(start + rows, len(ids))) for start in range(0, len(ids), rows)]


def build_index(kind: str, dim: int, shards: Sequence[Shard], progress: bool = False, **options: Any) -> VectorIndex:
    """A new index of a registered kind filled from ``shards``, loading one shard at a time.

    An index that builds from shards itself (``fill_from_shards``: IVF-PQ trains on a sample
    drawn across them, then encodes and merges shard by shard) does so; any other kind gets
    the shards through ``add``, one after another.
    """
    index = create_index(kind, dim, **options)
    fill = getattr(index, "fill_from_shards", None)
    if fill is not None:
        fill(shards, progress=progress)
        return index
    for shard in shards:
        index.add(*shard.load())
    return index


def load_index(folder: Path, mmap: bool = False) -> VectorIndex:
    """Open an index folder of any registered kind, as named by its ``index.json``.

    ``mmap=True`` maps the bulk data read-only instead of reading it into memory: quick to
    open and shared between processes, but the index cannot be modified.
    """
    kind = read_meta(Path(folder))["kind"]
    factory = resolve_factory(_registry().get(kind).factory)
    if not (isinstance(factory, type) and issubclass(factory, VectorIndex)):
        raise InputError(f"index backend {kind!r} is registered with a factory that is not a VectorIndex class, "
                         "so it cannot load folders")
    return factory.load(Path(folder), mmap=mmap)
