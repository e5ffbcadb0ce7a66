"""Multimodal queries: an example image plus words ("like this, but at night") as one search.

Against an index of single vectors, late fusion's weighted sum of similarities equals the
similarity to the weighted sum of the query embeddings, so every strategy comes down to one
query vector, which the index reader searches as usual (``IndexReader.search_fused``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError


def fused_query_vector(embedder, image: Any, text: str, fusion: str = "mean",
                       weights: str | Sequence[float] | None = None, fusion_bundle: str | Path | None = None) -> np.ndarray:
    """One (1, d) query vector from an image and a text, embedded by ``embedder`` (any runtime)."""
    from .items import fuse_items
    from .resolve import resolve_fusion

    if not isinstance(text, str) or not text.strip():
        raise InputError("the text part of a multimodal query must not be empty")
    strategy = resolve_fusion(embedder, fusion, weights, fusion_bundle)  # refuses before anything is embedded
    text_vector = np.asarray(embedder.embed_texts([text]), dtype=np.float32)
    image_vector = np.asarray(embedder.embed_images([image]), dtype=np.float32)
    return fuse_items(strategy, text_vector, image_vector)
