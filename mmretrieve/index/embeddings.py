"""The embeddings an index keeps, outside SQLite: one append-only file of float32 rows.

Each published item's row in ``items.sqlite`` names its *slot*, the row of this file that holds
its vector (the vector FAISS indexes, and what a new FAISS index is built from without
embedding anything again). Publishing appends the staged vectors and syncs the file before
the SQLite commit that names their slots, so every committed slot holds its vector; rows
appended by a run killed before its commit, and the rows of replaced or removed items, are
named by no item and are dropped when the store compacts the file into a new one.

Rows are read through ``np.memmap``, in file order, so reading all of them (a rebuild of the
FAISS index) streams the file and reading a few touches a few pages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

_ROW = np.dtype(np.float32)
NAME = re.compile(r"embeddings-(\d{6})\.f32")


def file_name(number: int) -> str:
    return f"embeddings-{number:06d}.f32"


def file_number(name: str) -> int:
    match = NAME.fullmatch(name)
    return int(match.group(1)) if match else 0


class EmbeddingFile:
    """The ``dim``-d float32 rows at ``path`` (a file that does not exist yet holds none)."""

    def __init__(self, path: Path, dim: int):
        self.path = Path(path)
        self.dim = int(dim)
        self.row_bytes = self.dim * _ROW.itemsize

    @property
    def rows(self) -> int:
        """Whole rows in the file (a row cut short by a kill is not one)."""
        try:
            return self.path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    def whole(self) -> bool:
        """The file holds whole rows only (or does not exist)."""
        try:
            return self.path.stat().st_size % self.row_bytes == 0
        except FileNotFoundError:
            return True

    def append(self, vectors: np.ndarray) -> int:
        """Write ``vectors`` after the last whole row, durably; returns the first one's slot."""
        data = np.ascontiguousarray(vectors, dtype=_ROW)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {data.shape} are not {self.dim}-d rows")
        created = not self.path.exists()
        with open(self.path, "ab") as out:
            size = out.seek(0, os.SEEK_END)
            pad = (-size) % self.row_bytes  # the tail of a row a killed append left half-written
            if pad:
                out.write(b"\0" * pad)
            out.write(data.data)
            out.flush()
            os.fsync(out.fileno())
        if created:
            _sync_folder(self.path.parent)
        return (size + pad) // self.row_bytes

    def read(self, slots: Iterable[int] | np.ndarray) -> np.ndarray:
        """The rows at ``slots``, in that order (a copy); ValueError for a slot past the end."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        out = np.empty((len(slots), self.dim), dtype=_ROW)
        if not len(slots):
            return out
        rows = self.rows
        if slots.min() < 0 or slots.max() >= rows:
            bad = int(slots[(slots < 0) | (slots >= rows)][0])
            raise ValueError(f"{self.path.name} holds {rows:,} rows, not row {bad:,}")
        matrix = np.memmap(self.path, dtype=_ROW, mode="r", shape=(rows, self.dim))
        try:
            order = np.argsort(slots, kind="stable")  # file order: sequential reads
            out[order] = matrix[slots[order]]
        finally:
            del matrix
        return out


def write_rows(path: Path, chunks: Iterable[np.ndarray], dim: int) -> int:
    """A new embeddings file at ``path`` holding ``chunks`` in order, synced; returns its rows."""
    rows = 0
    with open(path, "wb") as out:
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=_ROW)
            if len(chunk):
                if chunk.ndim != 2 or chunk.shape[1] != dim:
                    raise ValueError(f"vectors of shape {chunk.shape} are not {dim}-d rows")
                out.write(chunk.data)
                rows += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    _sync_folder(path.parent)
    return rows


def _sync_folder(folder: Path) -> None:
    """Make a new file's name durable (where the system allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
