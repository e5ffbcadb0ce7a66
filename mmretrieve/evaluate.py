"""Evaluating a retrieval model on a captioned set (CLIP_benchmark protocol)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import CaptionedImage
from .metrics import retrieval_metrics


def caption_owners(items: list[CaptionedImage]) -> np.ndarray:
    """Index of the image each caption (in flat order) belongs to."""
    return np.repeat(np.arange(len(items)), [len(item.captions) for item in items])


@torch.inference_mode()
def project(head: torch.nn.Module, features: torch.Tensor, device: torch.device, chunk: int = 4096) -> np.ndarray:
    """Head + normalisation over precomputed tower features."""
    head.eval()
    rows = []
    for start in range(0, len(features), chunk):
        out = head(features[start:start + chunk].to(device))
        rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy())
    return np.concatenate(rows)


def embed_captioned_set(model, items: list[CaptionedImage], batch_size: int, device: torch.device, workers: int = 0,
                        progress: bool = True, image_features: torch.Tensor | None = None,
                        text_features: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shared-space embeddings of every image and every caption; precomputed tower features
    (of frozen towers) skip the towers."""
    from .train.pipeline import all_captions, tower_features

    def through(modality, encoder, inputs, cached):
        head = model.image_head if modality == "image" else model.text_head
        if cached is None:
            cached = torch.from_numpy(tower_features(encoder, inputs, batch_size, device, workers, progress=progress))
        return project(head, cached, device)

    images = through("image", model.image_encoder, [item.image for item in items], image_features)
    texts = through("text", model.text_encoder, all_captions(items), text_features)
    return images, texts


def evaluate_model(model, items: list[CaptionedImage], batch_size: int = 64, device: torch.device | None = None,
                   workers: int = 0, progress: bool = True, **cached: Any) -> dict[str, dict[str, float]]:
    from .encoders.base import auto_device

    device = device or auto_device()
    model.to(device)
    images, texts = embed_captioned_set(model, items, batch_size, device, workers, progress, **cached)
    return retrieval_metrics(texts, images, caption_owners(items))
