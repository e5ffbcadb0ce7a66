"""Exact search: every query is scored against every vector (IndexIDMap2 over IndexFlatIP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import VectorIndex
from .faiss_lib import faiss, read_index_file, search_threads, write_index_file
from .idmap import SortedIds

FAISS_FILE = "flat.faiss"
# IndexIDMap2 keeps an unordered_map<int64, int64> from id to position; in libstdc++ that
# is a 24-byte node plus allocator overhead and a bucket pointer per entry.
HASH_MAP_ENTRY_BYTES = 40


class FlatIndex(VectorIndex):
    """Exact inner-product search; the reference the approximate kinds are measured against."""

    kind = "flat"

    def __init__(self, dim: int, **options):
        super().__init__(dim, **options)
        module = faiss()
        self._index = module.IndexIDMap2(module.IndexFlatIP(self.dim))

    @staticmethod
    def estimate_memory_bytes(n_vectors: int, dim: int) -> int:
        return n_vectors * (4 * dim + 8 + HASH_MAP_ENTRY_BYTES + 8)

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add_with_ids(vectors, ids)
        self._live.insert(ids)

    def _remove(self, ids: np.ndarray) -> None:
        self._index.remove_ids(ids)
        self._live.discard(ids)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with search_threads(len(queries)):
            return self._index.search(queries, k)

    def memory_bytes(self) -> int:
        n = self._index.ntotal
        vectors = 0 if self.read_only else n * 4 * self.dim  # mapped from the file after load(mmap=True)
        return vectors + n * (8 + HASH_MAP_ENTRY_BYTES) + self._live.nbytes

    def _save_files(self, folder: Path) -> None:
        write_index_file(self._index, folder / FAISS_FILE)

    def _load_files(self, folder: Path, mmap: bool) -> None:
        module = faiss()
        index = read_index_file(folder / FAISS_FILE, module.IO_FLAG_MMAP_IFC if mmap else 0)
        if not isinstance(index, module.IndexIDMap2) or index.d != self.dim:
            raise ValueError(f"{FAISS_FILE} is not a {self.dim}-d IndexIDMap2")
        self._index = index
        self._live = SortedIds.from_arrays(module.vector_to_array(index.id_map).astype(np.int64))
