"""The encoder interface every text or image tower implements."""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..embedding import auto_device, embed_batched  # noqa: F401 - auto_device is imported from here too


class Encoder(abc.ABC):
    """A tower: its torch module, its own preprocessing, and what rebuilding and export need.

    ``module(**inputs)`` maps the preprocessor's arrays (as tensors) to ``(batch, dim)``
    features. ``family`` names the built-in encoder that can rebuild the architecture offline
    from the files ``save_architecture`` writes, so a bundle never depends on the plugin or
    hub that first produced its weights.
    """

    family: ClassVar[str]
    modality: ClassVar[str]  # "text" or "image"
    input_names: ClassVar[tuple[str, ...]]
    dynamic_axes: ClassVar[dict[str, dict[int, str]]]

    def __init__(self, module: nn.Module, preprocessor: Callable[[Sequence[Any]], dict[str, np.ndarray]], dim: int):
        self.module = module
        self.preprocessor = preprocessor
        self.dim = int(dim)

    def preprocess(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.preprocessor(items)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**inputs)

    def embed(self, items: Sequence[Any], batch_size: int = 32, normalize: bool = True,
              device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
        """Embed texts (strings) or images (paths or PIL images) into float32 rows."""
        return embed_batched(items, self.preprocess, lambda inputs: self.features(inputs, normalize), self.module,
                             self.dim, self.modality, batch_size, device, progress)

    def features(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``forward`` in float32, L2-normalised unless ``normalize`` is False."""
        features = self.forward(inputs).float()
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    # Module-name suffixes LoRA adapts by default (attention projections).
    lora_targets: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def layer_groups(self) -> list[list[str]]:
        """Parameter names grouped by depth, input side first: what "train the top N" counts."""

    @abc.abstractmethod
    def enable_grad_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of storing them."""

    @abc.abstractmethod
    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        """Inputs of the right names, shapes and dtypes, for export and smoke tests."""

    @abc.abstractmethod
    def save_architecture(self, folder: Path) -> dict[str, Any]:
        """Write config, tokenizer and preprocessing files (no weights); return rebuild options."""

    @classmethod
    def from_bundle(cls, folder: Path, options: dict[str, Any]) -> "Encoder":
        """Rebuild the architecture from a bundle's tower folder (what ``save_architecture`` wrote
        there) and the options it returned; ``load_bundle`` then loads the bundle's weights and
        preprocessing into it. By default ``cls(**options)``, with ``pretrained=False`` when the
        constructor takes it (weights the bundle replaces are not fetched). Override it when the
        folder's files stand in for something the options name (``bert`` reads its checkpoint there)."""
        from ..specs import rebuild_options

        return cls(**rebuild_options(cls, options))

    def export_context(self) -> contextlib.AbstractContextManager:
        """Entered while the tower is traced into an ONNX graph (mmretrieve.export.graph), whose
        inputs keep their example's size on every axis its ``dynamic_axes`` leave out."""
        return contextlib.nullcontext()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.modality} dim={self.dim} params={self.num_parameters() / 1e6:.2f}M>"
