"""The fusion strategies: one small interface, four built-ins.

A strategy combines the normalised text and image embeddings of the same n things:
``fuse(text, image)`` returns one normalised (n, d) embedding each, and ``scores(queries,
text, image)`` ranks such things for (q, d) queries. Late fusion has no single embedding;
it overrides ``scores`` to weigh the per-modality similarities instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError, InputError
from .weights import parse_weights


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def check_pair(text: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    text, image = np.asarray(text, dtype=np.float32), np.asarray(image, dtype=np.float32)
    if text.ndim != 2 or text.shape != image.shape:
        raise InputError(f"text and image embeddings must both be (n, d) arrays of one shape, "
                         f"got {text.shape} and {image.shape}")
    return text, image


class FusionStrategy:
    """Base: subclasses implement ``fuse``; ``late`` ones override ``scores`` instead."""

    name = ""
    trainable = False
    late = False  # True: no fused vector, similarities are combined at search time

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scores(self, queries: np.ndarray, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(q, n) similarities of each query to each fused thing."""
        return np.asarray(queries, dtype=np.float32) @ self.fuse(text, image).T


class LateFusion(FusionStrategy):
    """w_txt · sim(query, text) + w_img · sim(query, image); nothing to train."""

    name = "late"
    late = True

    def __init__(self, dim: int | None = None, weights: str | Sequence[float] | None = None):
        self.weights = parse_weights(weights)

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        raise ConfigError("late fusion combines similarities at search time and has no fused embedding; "
                          "use `mean` for one vector per item")

    def scores(self, queries: np.ndarray, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        text, image = check_pair(text, image)
        queries = np.asarray(queries, dtype=np.float32)
        return (self.weights[0] * (queries @ text.T) + self.weights[1] * (queries @ image.T)).astype(np.float32)


class MeanFusion(FusionStrategy):
    """normalise(w_txt · f_txt + w_img · f_img); nothing to train."""

    name = "mean"

    def __init__(self, dim: int | None = None, weights: str | Sequence[float] | None = None):
        self.weights = parse_weights(weights)

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        text, image = check_pair(text, image)
        return _unit(self.weights[0] * text + self.weights[1] * image)


class LearnedFusion(FusionStrategy):
    """A trainable head (``mmretrieve.fusion.heads``) behind the numpy interface."""

    trainable = True

    def __init__(self, name: str, dim: int, weights: str | Sequence[float] | None = None):
        from .heads import HEADS

        if weights is not None:
            raise ConfigError(f"{name} learns how to weigh text and image, so it takes no weights; "
                              f"weights apply to `late` and `mean`")
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"{name} needs the embedding dimension (a positive integer), got {dim!r}")
        self.name = name
        self.dim = dim
        self.head = HEADS[name](dim)

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        import torch

        text, image = check_pair(text, image)
        if text.shape[1] != self.dim:
            raise InputError(f"{self.name} head fuses {self.dim}-d embeddings, got {text.shape[1]}-d")
        self.head.eval()
        with torch.inference_mode():
            return self.head(torch.from_numpy(text), torch.from_numpy(image)).float().numpy()


def concat_projection(dim: int, weights=None) -> LearnedFusion:
    return LearnedFusion("concat-projection", dim, weights)


def gated(dim: int, weights=None) -> LearnedFusion:
    return LearnedFusion("gated", dim, weights)
