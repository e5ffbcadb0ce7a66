"""Reading the small id arrays index folders keep as ``.npy`` files (written with atomic.write_npy_atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_npy(path: Path, dtype: type) -> np.ndarray:
    """A 1-d array of ``dtype``; ValueError when the file holds something else."""
    array = np.load(path, allow_pickle=False)
    if array.ndim != 1 or array.dtype != np.dtype(dtype):
        raise ValueError(f"{path.name} holds a {array.dtype} array of shape {array.shape}, not 1-d {np.dtype(dtype)}")
    return np.array(array)  # writable, even where np.load mapped nothing
