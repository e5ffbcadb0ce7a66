"""Multimodal queries: an example image plus words ("like this, but at night") as one search.

Against an index of single vectors, late fusion's weighted sum of similarities equals the
similarity to the weighted sum of the query embeddings, so every strategy comes down to one
query vector and the index searches it as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError


def fused_query_vector(embedder, image: Any, text: str, fusion: str = "mean",
                       weights: str | Sequence[float] | None = None, fusion_bundle: str | Path | None = None) -> np.ndarray:
    """One (1, d) query vector from an image and a text, embedded by ``embedder`` (any runtime)."""
    from ..plugins import get_host
    from . import create_fusion, is_trainable

    if not isinstance(text, str) or not text.strip():
        raise InputError("the text part of a multimodal query must not be empty")
    text_vector = np.asarray(embedder.embed_texts([text]), dtype=np.float32)
    image_vector = np.asarray(embedder.embed_images([image]), dtype=np.float32)
    if is_trainable(fusion):
        if fusion_bundle is None:
            raise ConfigError(f"{fusion} is a trained strategy; pass the fusion bundle trained for this model "
                              f"(python -m mmretrieve.fusion.experiment writes one)")
        if weights is not None:
            raise ConfigError(f"{fusion} learns how to weigh text and image, so it takes no weights")
        from .store import load_fusion

        strategy = load_fusion(fusion_bundle, base_fingerprint=embedder.fingerprint)
        if strategy.name != get_host().registry("fusion").get(fusion).name:  # aliases resolved
            raise ConfigError(f"{fusion_bundle} holds a {strategy.name} head, not {fusion}")
        return strategy.fuse(text_vector, image_vector)
    strategy = create_fusion(fusion, weights=weights)
    if strategy.late:
        # Scores stay the weighted sum of the two similarities, as late fusion promises.
        return (strategy.weights[0] * text_vector + strategy.weights[1] * image_vector).astype(np.float32)
    return strategy.fuse(text_vector, image_vector)


def search_fused(reader, image: Any, text: str, k: int = 10, fusion: str = "mean",
                 weights: str | Sequence[float] | None = None, fusion_bundle: str | Path | None = None,
                 min_score: float | None = None):
    """Hits for one multimodal query in an ``IndexReader`` (or an index folder)."""
    if isinstance(reader, (str, Path)):
        from ..index.search import IndexReader

        reader = IndexReader(reader)
    vector = fused_query_vector(reader.embedder, image, text, fusion, weights, fusion_bundle)
    return reader.search_vectors(vector, k, min_score)[0]
