"""Retrieval metrics under the CLIP_benchmark protocol, and the bar an exported graph must meet
(NumPy only, so every layer can import it).

Every caption is a text->image query whose single correct answer is its image. Every image is
an image->text query that hits at K when any of its captions ranks in the top K. Recall is in
percent; the median rank is 1-based (of the best-ranked correct item).

Ties count against the query: an incorrect item scoring exactly as high as the best correct one
ranks above it. So a model whose embeddings are all identical (or all zero) ranks every correct
item last and scores at or below chance, never 100%. A NaN score ranks below every number.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)

# Minimum cosine, per embedding, between an fp32 ONNX graph and the PyTorch module it came from:
# both the towers' export and a fusion head's graph are refused below it.
PARITY_MIN_COSINE = 0.9999


def ranks_of_best_hit(scores: np.ndarray, is_correct: np.ndarray) -> np.ndarray:
    """For each row of ``scores`` (queries x items), the 1-based rank of its best correct item:
    1 + items scoring strictly higher + incorrect items scoring the same (ties broken against
    the query). Other correct items tied with the best one do not count."""
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best_correct = np.where(is_correct, scores, -np.inf).max(axis=1, keepdims=True)
    higher = (scores > best_correct).sum(axis=1)
    tied = ((scores == best_correct) & ~is_correct).sum(axis=1)
    return higher + tied + 1


def ranks_of_truth(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``ranks_of_best_hit`` for queries with one correct item each: column ``truth[i]`` of row i."""
    correct = np.zeros(scores.shape, dtype=bool)
    correct[np.arange(len(truth)), truth] = True
    return ranks_of_best_hit(scores, correct)


def recall_at_k(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{"R@k": percent of queries whose rank is at most k}, rounded to 2 decimals."""
    return {f"R@{k}": round(float((np.asarray(ranks) <= k).mean() * 100.0), 2) for k in ks}


def summarise(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K for each k and the median rank."""
    out = recall_at_k(ranks, ks)
    out["median_rank"] = float(np.median(ranks))
    return out


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
        t2i_ranks.append(ranks_of_truth(scores, caption_image[start:start + chunk]))
    i2t_ranks = []
    for start in range(0, n_images, chunk):
        scores = image_embeddings[start:start + chunk] @ text_embeddings.T
        correct = caption_image[None, :] == np.arange(start, min(start + chunk, n_images))[:, None]
        i2t_ranks.append(ranks_of_best_hit(scores, correct))
    return {"t2i": summarise(np.concatenate(t2i_ranks), ks), "i2t": summarise(np.concatenate(i2t_ranks), ks)}


def mean_recall(metrics: dict[str, dict[str, float]]) -> float:
    """One number to select checkpoints by: the mean of every R@K in both directions."""
    values = [v for direction in metrics.values() for k, v in direction.items() if k.startswith("R@")]
    return float(np.mean(values))
