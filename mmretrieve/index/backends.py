"""The vector-index API: ``create_index``, ``load_index``, ``choose_index_type`` and the kinds.

Every index stores L2-normalised float32 vectors under int64 ids and scores by inner
product (cosine similarity). Kinds are plugins (``register_index_backends``); the built-in
``flat``, ``hnsw`` and ``ivfpq`` are registered by ``mmretrieve.default_plugins.index_backends``.
faiss uses its own OpenMP thread count (``faiss.omp_set_num_threads``); nothing here sets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..specs import resolve_factory
from .base import VectorIndex, read_meta
from .choose import choose_index_type
from .flat import FlatIndex
from .hnsw import HNSWIndex
from .ivfpq import IVFPQIndex

__all__ = ["VectorIndex", "FlatIndex", "HNSWIndex", "IVFPQIndex", "create_index", "load_index", "choose_index_type"]


def _registry():
    from ..plugins import get_host

    return get_host().registry("index_backend")


def create_index(kind: str, dim: int, **options: Any) -> VectorIndex:
    """A new, empty index of a registered kind; an unknown kind raises UnknownNameError."""
    return _registry().get(kind).build(dim=dim, **options)


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
