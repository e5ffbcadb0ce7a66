"""The one place that imports faiss, so a missing install fails with one clear message."""

from __future__ import annotations

import contextlib
import errno
import functools
from pathlib import Path
from types import ModuleType
from typing import Iterator

from ..atomic import write_bytes_atomic
from ..errors import MMRetrieveError
from ..threads import current_policy


@functools.cache
def faiss() -> ModuleType:
    """Import faiss on first use; cached so later calls cost a dictionary look-up.

    A failed import is not cached, so installing faiss in a running notebook then works.
    """
    try:
        import faiss as module
    except ImportError as exc:
        # An environment problem, not bad input: the base error, which the CLI prints as is.
        raise MMRetrieveError(
            "vector indexes need faiss, which is not installed in this environment: "
            "run `pip install faiss-cpu` and try again"
        ) from exc
    return module


@contextlib.contextmanager
def search_threads(n_queries: int) -> Iterator[None]:
    """faiss's OpenMP threads, for a search of ``n_queries``, as the thread policy says.

    IndexIDMap2 (the flat index) translates ids in an OpenMP loop on every search: waking a thread
    per core for a few queries cost more than the search, 1.55x a warm text query on 2 cores
    (benchmarks/faiss_search_threads.py). hnsw and ivfpq measured 0.99x and 0.97x there, so they
    keep faiss's own threads. OpenMP keeps the count per calling thread, so it is set on the thread
    that searches and put back after (torch may share the OpenMP runtime and read the same setting).
    """
    module = faiss()
    before, wanted = module.omp_get_max_threads(), current_policy().faiss_threads(n_queries)
    if wanted == before:
        yield
        return
    module.omp_set_num_threads(wanted)
    try:
        yield
    finally:
        module.omp_set_num_threads(before)


def write_index_file(index: object, path: Path) -> None:
    """Serialise a faiss index into ``path`` atomically (readers never see half a file)."""
    write_bytes_atomic(path, faiss().serialize_index(index).data)


def read_index_file(path: Path, flags: int = 0) -> object:
    """Read a faiss index; ``flags`` may map its bulk data read-only.

    ``IO_FLAG_MMAP_IFC`` maps flat codes (flat, HNSW storage) and ``IO_FLAG_MMAP`` inverted
    lists (IVF); faiss refuses the two together. A mapped index must never grow: faiss
    aborts the process on an append to mapped storage, so callers mark it read-only.
    """
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    return faiss().read_index(str(path), flags)
