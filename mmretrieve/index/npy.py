"""Small numpy arrays to and from ``.npy`` bytes, so they can be written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_npy(path: Path, dtype: type) -> np.ndarray:
    """A 1-d array of ``dtype``; ValueError when the file holds something else."""
    array = np.load(path, allow_pickle=False)
    if array.ndim != 1 or array.dtype != np.dtype(dtype):
        raise ValueError(f"{path.name} holds a {array.dtype} array of shape {array.shape}, not 1-d {np.dtype(dtype)}")
    return np.array(array)  # writable, even where np.load mapped nothing
