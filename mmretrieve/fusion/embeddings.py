"""Shared-space embeddings of a captioned set, with the towers' raw features cached on disk.

Fusion heads train and evaluate on embeddings only, so the expensive part (running the
towers over thousands of images) happens once per (model towers, inputs) and is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import CaptionedImage


@dataclass
class CaptionedEmbeddings:
    images: np.ndarray  # (n_images, d), normalised
    texts: np.ndarray  # (n_captions, d), normalised, in file order
    owners: np.ndarray  # (n_captions,) index of each caption's image

    def captions_of(self, image: int) -> np.ndarray:
        return np.flatnonzero(self.owners == image)


def embed_captioned(model, items: list[CaptionedImage], cache_dir: str | Path | None = None, label: str = "set",
                    batch_size: int = 64, workers: int = 0, device: str | None = None) -> CaptionedEmbeddings:
    """Every image and caption of ``items`` in ``model``'s shared space.

    Raw tower features go through ``mmretrieve.embedding.cached_tower_features`` (keyed by the towers' weights,
    preprocessing and the inputs), so a second call with the same model and data is instant.
    """
    import torch

    from ..data import all_captions
    from ..embedding import auto_device, cached_tower_features
    from ..evaluate import caption_owners, project
    from ..bundle import tower_fingerprint

    device = torch.device(device) if device else auto_device()
    model.to(device)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    image_features = cached_tower_features(model.image_encoder, [item.image for item in items], cache, batch_size,
                                           device, f"image-{label}", tower_fingerprint(model.image_encoder), workers)
    text_features = cached_tower_features(model.text_encoder, all_captions(items), cache, batch_size,
                                          device, f"text-{label}", tower_fingerprint(model.text_encoder), workers)
    images = project(model.projection("image"), image_features, device)
    texts = project(model.projection("text"), text_features, device)
    return CaptionedEmbeddings(images.astype(np.float32), texts.astype(np.float32), caption_owners(items))
