"""Retrieval metrics under the CLIP_benchmark protocol (NumPy only).

Every caption is a text->image query whose single correct answer is its image. Every image is
an image->text query that hits at K when any of its captions ranks in the top K. Recall is in
percent; the median rank is 1-based (of the best-ranked correct item).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def _ranks_of_best_hit(scores: np.ndarray, is_correct: np.ndarray) -> np.ndarray:
    """For each row: 1 + how many items score strictly higher than the best correct item."""
    best_correct = np.where(is_correct, scores, -np.inf).max(axis=1, keepdims=True)
    return (scores > best_correct).sum(axis=1) + 1


def retrieval_metrics(text_embeddings: np.ndarray, image_embeddings: np.ndarray, caption_image: np.ndarray,
                      ks: tuple[int, ...] = KS, chunk: int = 1024) -> dict[str, dict[str, float]]:
    """Recall@K and median rank both ways.

    text_embeddings: (T, d) normalised; image_embeddings: (I, d) normalised;
    caption_image: (T,) index of each caption's image.
    """
    caption_image = np.asarray(caption_image)
    n_images = image_embeddings.shape[0]
    t2i_ranks = []
    for start in range(0, len(text_embeddings), chunk):
        scores = text_embeddings[start:start + chunk] @ image_embeddings.T
        truth = caption_image[start:start + chunk]
        correct = np.zeros_like(scores, dtype=bool)
        correct[np.arange(len(truth)), truth] = True
        t2i_ranks.append(_ranks_of_best_hit(scores, correct))
    i2t_ranks = []
    for start in range(0, n_images, chunk):
        scores = image_embeddings[start:start + chunk] @ text_embeddings.T
        correct = caption_image[None, :] == np.arange(start, min(start + chunk, n_images))[:, None]
        i2t_ranks.append(_ranks_of_best_hit(scores, correct))
    return {"t2i": _summarise(np.concatenate(t2i_ranks), ks), "i2t": _summarise(np.concatenate(i2t_ranks), ks)}


def _summarise(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    out = {f"R@{k}": round(float((ranks <= k).mean() * 100.0), 2) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    return out


def mean_recall(metrics: dict[str, dict[str, float]]) -> float:
    """One number to select checkpoints by: the mean of every R@K in both directions."""
    values = [v for direction in metrics.values() for k, v in direction.items() if k.startswith("R@")]
    return float(np.mean(values))
