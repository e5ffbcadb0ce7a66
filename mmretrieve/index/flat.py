"""Exact search: every query is scored against every vector (IndexIDMap2 over IndexFlatIP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..threads import current_policy
from .base import VectorIndex
from .faiss_lib import faiss, read_index_file, write_index_file
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
        # IndexIDMap2 maps ids in an OpenMP loop on every search: waking a thread per core for a few
        # queries cost more than the search (a warm text query 1.55x on 2 cores; hnsw and ivfpq
        # gained nothing: benchmarks/faiss_search_threads.py), so few queries use one.
        # OpenMP keeps the count per calling thread, so it is set here, on the thread that searches,
        # and put back after (torch may share the OpenMP runtime and read the same setting).
        module = faiss()
        before, wanted = module.omp_get_max_threads(), current_policy().faiss_threads(len(queries))
        if wanted == before:
            return self._index.search(queries, k)
        module.omp_set_num_threads(wanted)
        try:
            return self._index.search(queries, k)
        finally:
            module.omp_set_num_threads(before)

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
