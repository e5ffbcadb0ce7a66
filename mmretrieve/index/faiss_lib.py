"""The one place that imports faiss, so a missing install fails with one clear message."""

from __future__ import annotations

import errno
import functools
from pathlib import Path
from types import ModuleType

from ..atomic import write_bytes_atomic
from ..errors import MMRetrieveError


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
