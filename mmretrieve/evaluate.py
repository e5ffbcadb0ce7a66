"""Evaluating a retrieval model on a captioned set (CLIP_benchmark protocol).

A PyTorch model (``evaluate_model``) or any runtime's embedder (``evaluate_embedder``); the
embedder path never imports torch, so the onnx runtime evaluates without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .data import CaptionedImage, all_captions
from .metrics import retrieval_metrics

if TYPE_CHECKING:  # torch is imported inside the functions that need it
    import torch


def caption_owners(items: list[CaptionedImage]) -> np.ndarray:
    """Index of the image each caption (in flat order) belongs to."""
    return np.repeat(np.arange(len(items)), [len(item.captions) for item in items])


def project(head: torch.nn.Module, features: torch.Tensor, device: torch.device, chunk: int = 4096) -> np.ndarray:
    """Head + normalisation over precomputed tower features."""
    import torch

    head.eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(features), chunk):
            out = head(features[start:start + chunk].to(device))
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy())
    return np.concatenate(rows)


def embed_captioned_set(model, items: list[CaptionedImage], batch_size: int, device: torch.device, workers: int = 0,
                        progress: bool = True, image_features: torch.Tensor | None = None,
                        text_features: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shared-space embeddings of every image and every caption; precomputed tower features
    (of frozen towers) skip the towers."""
    import torch

    from .embedding import tower_features

    def through(modality, encoder, inputs, cached):
        head = model.projection(modality)  # the head (and the label bridge, if the model has one)
        if cached is None:
            cached = torch.from_numpy(tower_features(encoder, inputs, batch_size, device, workers, progress=progress))
        return project(head, cached, device)

    images = through("image", model.image_encoder, [item.image for item in items], image_features)
    texts = through("text", model.text_encoder, all_captions(items), text_features)
    return images, texts


def evaluate_model(model, items: list[CaptionedImage], batch_size: int = 64, device: torch.device | None = None,
                   workers: int = 0, progress: bool = True, **cached: Any) -> dict[str, dict[str, float]]:
    from .embedding import auto_device

    device = device or auto_device()
    model.to(device)
    images, texts = embed_captioned_set(model, items, batch_size, device, workers, progress, **cached)
    return retrieval_metrics(texts, images, caption_owners(items))


def embed_with_embedder(embedder, items: list[CaptionedImage], batch_size: int = 64, workers: int = 0,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every image and every caption (flat, in file order) through a runtime's embedder; an image
    that cannot be used stops the run with an InputError naming it."""
    from .embedding import embed_image_paths, embed_in_batches
    from .progress import progress_bar

    paths = [str(item.image) for item in items]
    captions = all_captions(items)
    with progress_bar(total=len(paths) + len(captions), unit="item", desc="eval", disable=not progress) as bar:
        images, _, _ = embed_image_paths(paths, embedder.image_preprocessor, embedder.embed_pixels, batch_size,
                                         embedder.embed_dim, workers, bar, strict=True)
        texts = embed_in_batches(captions, embedder.embed_texts, batch_size, embedder.embed_dim, bar)
    return images, texts


def evaluate_embedder(embedder, items: list[CaptionedImage], batch_size: int = 64, workers: int = 0,
                      progress: bool = True) -> dict[str, dict[str, float]]:
    """The same metrics as ``evaluate_model``, through any runtime (torch, onnx, ...)."""
    images, texts = embed_with_embedder(embedder, items, batch_size, workers, progress)
    return retrieval_metrics(texts, images, caption_owners(items))
