"""Resumable training state, written atomically.

The checkpoint holds the trainable parameters and every buffer (frozen weights are rebuilt
from the config), the optimiser, scheduler and grad-scaler states, all RNG states and the
data position. It is saved with torch.save and read back with ``weights_only=True``, which
refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_directory, recover_directory
from ..errors import BundleError

STATE_FILE = "state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus persistent buffers (normalisation statistics)."""
    parameters = dict(model.named_parameters())
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()
            if name not in parameters or parameters[name].requires_grad}


def rng_state() -> dict[str, Any]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_directory(folder) as staging:
        (staging / STATE_FILE).write_bytes(buffer.getvalue())


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint (one left aside by a kill during its save counts)."""
    recover_directory(folder)
    return (Path(folder) / STATE_FILE).is_file()


def load_checkpoint(folder: Path) -> dict[str, Any]:
    recover_directory(folder)
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise BundleError(f"no checkpoint to resume from in {folder}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be trusted
        raise BundleError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
