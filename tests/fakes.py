"""A deterministic, fast stand-in for an embedder: the index machinery needs only these attributes."""

from __future__ import annotations

import numpy as np


class CoarseColours:
    """A picklable preprocessor: an image becomes its first ``dim`` coarse colour values (+1, so never zero)."""

    def __init__(self, dim: int = 12):
        self.dim = dim

    def transform(self, image):
        return np.asarray(image.convert("RGB").resize((2, 2)), dtype=np.float32).reshape(-1)[: self.dim] + 1.0


class ColourEmbedder:
    """Embeds an image as its normalised coarse colours; ``name`` is its model ref (and fingerprint stem)."""

    def __init__(self, name: str = "fake-model", dim: int = 12):
        self.ref = self.path = name
        self.fingerprint = f"{name}-1"
        self.embed_dim = dim
        self.image_preprocessor = CoarseColours(dim)

    def embed_pixels(self, pixels):
        vectors = np.asarray(pixels, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
