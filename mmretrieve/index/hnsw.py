"""Graph search (IndexHNSWFlat, inner product), with removal by tombstones.

faiss cannot delete from an HNSW graph, so a removed vector stays in the graph as a
tombstone: its row's id becomes -1 and searches pass faiss a bitmap of live rows
(``IDSelectorBitmap``), so the graph still routes through removed nodes but never returns
them and a query still gets ``k`` live results. When tombstones pass
``COMPACT_FRACTION`` of the rows, ``remove`` rebuilds the graph from the live vectors; that
call then costs as much as building the index afresh.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import write_npy_atomic
from ..errors import ConfigError
from .base import VectorIndex
from .faiss_lib import faiss, read_index_file, write_index_file
from .idmap import SortedIds
from .npy import read_npy

FAISS_FILE = "hnsw.faiss"
ROW_IDS_FILE = "row_ids.npy"
COMPACT_FRACTION = 0.2


class HNSWIndex(VectorIndex):
    """Approximate search on an HNSW graph: fast queries, memory of the vectors plus ~8*M bytes each.

    Options: ``M`` links per node (graph degree; 2*M on the bottom layer), ``ef_construction``
    (candidate list while building; higher builds slower, a better graph), ``ef_search``
    (candidate list while searching; the recall/latency knob, changeable after building).
    """

    kind = "hnsw"
    OPTION_DEFAULTS = {"M": 32, "ef_construction": 80, "ef_search": 96}
    SEARCH_OPTIONS = frozenset({"ef_search"})
    TRACKS_ROWS = True

    def __init__(self, dim: int, **options):
        super().__init__(dim, **options)
        self._index = self._new_graph()
        self._row_ids = np.empty(0, dtype=np.int64)  # row -> id, -1 for a tombstone
        self._live_bitmap: tuple[np.ndarray, object] | None = None  # cached (bits, selector)

    def _check_options(self, options: dict) -> None:
        if self._positive_int(options, "M", 2) > 512:
            raise ConfigError("hnsw index: M above 512 only costs memory")
        self._positive_int(options, "ef_construction")
        self._positive_int(options, "ef_search")

    @staticmethod
    def estimate_memory_bytes(n_vectors: int, dim: int, M: int = OPTION_DEFAULTS["M"]) -> int:
        # Vectors, 2*M bottom-layer links plus about one upper-layer link per node (4 bytes
        # each), faiss's offsets and levels, then the row -> id and sorted id tables.
        return n_vectors * (4 * dim + 4 * (2 * M + 1) + 12 + 8 + 16)

    def _new_graph(self) -> object:
        module = faiss()
        index = module.IndexHNSWFlat(self.dim, self.options["M"], module.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.options["ef_construction"]
        return index

    @property
    def tombstones(self) -> int:
        return len(self._row_ids) - len(self._live)

    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        first = len(self._row_ids)
        self._index.add(vectors)
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._live.insert(ids, np.arange(first, first + len(ids), dtype=np.int64))
        self._live_bitmap = None

    def _remove(self, ids: np.ndarray) -> None:
        rows = self._live.discard(ids)
        self._row_ids[rows] = -1
        self._live_bitmap = None
        if self.tombstones > COMPACT_FRACTION * len(self._row_ids):
            self.compact()

    def compact(self) -> None:
        """Rebuild the graph from the live vectors only, dropping every tombstone."""
        self._check_writable()
        live_rows = np.flatnonzero(self._row_ids >= 0)
        vectors = self._index.reconstruct_batch(live_rows) if len(live_rows) else None
        ids = self._row_ids[live_rows]
        self._index = self._new_graph()
        self._row_ids = np.empty(0, dtype=np.int64)
        self._live = SortedIds(track_rows=True)
        self._live_bitmap = None
        if vectors is not None:
            self._add(ids, vectors)

    def _search_params(self) -> object:
        module = faiss()
        params = module.SearchParametersHNSW()
        params.efSearch = self.options["ef_search"]
        if self.tombstones:
            if self._live_bitmap is None:
                bits = np.packbits(self._row_ids >= 0, bitorder="little")
                self._live_bitmap = (bits, module.IDSelectorBitmap(len(self._row_ids), module.swig_ptr(bits)))
            params.sel = self._live_bitmap[1]  # ``bits`` stays referenced by the cache
        return params

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self._index.search(queries, k, params=self._search_params())
        # A -1 row is faiss's own padding; a tombstoned row maps to -1 too, in case a
        # selector-less search ever returned one.
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return scores, ids

    def memory_bytes(self) -> int:
        graph = self._index.hnsw
        vectors = 0 if self.read_only else self._index.ntotal * 4 * self.dim  # mapped after load(mmap=True)
        return (vectors + 4 * graph.neighbors.size() + 8 * graph.offsets.size() + 4 * graph.levels.size()
                + self._row_ids.nbytes + self._live.nbytes)

    def _save_files(self, folder: Path) -> None:
        write_index_file(self._index, folder / FAISS_FILE)
        write_npy_atomic(folder / ROW_IDS_FILE, self._row_ids)

    def _load_files(self, folder: Path, mmap: bool) -> None:
        module = faiss()
        index = read_index_file(folder / FAISS_FILE, module.IO_FLAG_MMAP_IFC if mmap else 0)
        if not isinstance(index, module.IndexHNSWFlat) or index.d != self.dim:
            raise ValueError(f"{FAISS_FILE} is not a {self.dim}-d IndexHNSWFlat")
        row_ids = read_npy(folder / ROW_IDS_FILE, np.int64)
        if len(row_ids) != index.ntotal:
            raise ValueError(f"{ROW_IDS_FILE} has {len(row_ids)} rows, the graph {index.ntotal}")
        live_rows = np.flatnonzero(row_ids >= 0)
        self._index = index
        self._row_ids = row_ids
        self._live = SortedIds.from_arrays(row_ids[live_rows], live_rows)
