"""An append-only float32 matrix on disk, read through ``np.memmap``.

IVF-PQ keeps only compressed codes in memory; the full vectors it re-ranks with live here,
so their pages are cached by the OS when there is room and evicted when there is not.
A fresh matrix lives in an anonymous temporary file (gone when the process ends). One read
from a saved index maps the saved file read-only; the first append copies it to a temporary
file first, so an index folder on disk never changes behind its ``index.json``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..atomic import write_bytes_atomic

_ROW_DTYPE = np.dtype(np.float32)
_COPY_CHUNK = 64 << 20


class VectorFile:
    def __init__(self, dim: int, path: Path | None = None):
        """An empty scratch matrix, or the saved matrix at ``path`` opened read-only."""
        self.dim = dim
        self._scratch: BinaryIO | None = None
        self._path = path
        self._view: np.ndarray | None = None
        if path is None:
            self._rows = 0
            return
        size = path.stat().st_size
        row_bytes = dim * _ROW_DTYPE.itemsize
        if size % row_bytes:
            raise ValueError(f"{path} holds {size} bytes, not a whole number of {dim}-d float32 rows")
        self._rows = size // row_bytes

    def __len__(self) -> int:
        return self._rows

    def view(self) -> np.ndarray:
        """All rows as a read-only (rows, dim) array mapped from the file."""
        if self._view is None:
            if self._rows == 0:
                self._view = np.empty((0, self.dim), dtype=_ROW_DTYPE)
            else:
                source = self._scratch if self._scratch is not None else self._path
                self._view = np.memmap(source, dtype=_ROW_DTYPE, mode="r", shape=(self._rows, self.dim))
        return self._view

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Copy the given rows into memory; reading them in file order keeps the I/O sequential."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=_ROW_DTYPE)
        out[order] = self.view()[rows[order]]
        return out

    def append(self, vectors: np.ndarray) -> None:
        if self._scratch is None:
            self._scratch = self._copy_to_scratch()
        self._scratch.seek(0, 2)
        self._scratch.write(np.ascontiguousarray(vectors, dtype=_ROW_DTYPE).data)
        self._scratch.flush()
        self._rows += len(vectors)
        self._view = None  # a mapping has a fixed length; map again on the next read

    def _copy_to_scratch(self) -> BinaryIO:
        scratch = tempfile.TemporaryFile(prefix="mmretrieve-vectors-", suffix=".f32")
        if self._path is not None:
            with open(self._path, "rb") as source:
                shutil.copyfileobj(source, scratch, _COPY_CHUNK)
        return scratch

    def save(self, path: Path) -> None:
        # A memoryview of the mapping streams the pages to the new file without a second copy.
        write_bytes_atomic(path, memoryview(self.view()) if self._rows else b"")

    def close(self) -> None:
        self._view = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
