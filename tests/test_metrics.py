"""Recall@K under the CLIP_benchmark protocol, on hand-made embeddings with known ranks."""

import numpy as np

from mmretrieve.metrics import mean_recall, retrieval_metrics


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_perfect_embeddings_score_100():
    images = np.eye(4, dtype=np.float32)
    texts = np.repeat(images, 2, axis=0)  # two captions per image
    metrics = retrieval_metrics(texts, images, np.repeat(np.arange(4), 2), ks=(1, 2))
    assert metrics["t2i"] == {"R@1": 100.0, "R@2": 100.0, "median_rank": 1.0}
    assert metrics["i2t"] == {"R@1": 100.0, "R@2": 100.0, "median_rank": 1.0}


def test_image_to_text_hits_when_any_caption_is_in_top_k():
    images = unit([[1, 0, 0], [0, 1, 0]])
    texts = unit([
        [0, 0.9, 0.1],  # caption 0, of image 0, but it describes image 1
        [1, 0, 0],      # caption 1, of image 0, exact
        [0.3, 0.5, 0.8],  # caption 2, of image 1, weakly
    ])
    metrics = retrieval_metrics(texts, images, np.array([0, 0, 1]), ks=(1, 2))
    # image 0: caption 1 ranks first, so it hits at 1 although caption 0 is off.
    # image 1: caption 0 (image 0's) outranks caption 2, so its first hit is at rank 2.
    assert metrics["i2t"] == {"R@1": 50.0, "R@2": 100.0, "median_rank": 1.5}
    # caption 0 finds image 1 first (rank 2 for its own); captions 1 and 2 find theirs first.
    assert metrics["t2i"] == {"R@1": 66.67, "R@2": 100.0, "median_rank": 1.0}


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    images = unit(rng.standard_normal((37, 8)))
    texts = unit(rng.standard_normal((111, 8)))
    caption_image = rng.integers(0, 37, 111)
    caption_image[:37] = np.arange(37)  # every image has at least one caption
    assert retrieval_metrics(texts, images, caption_image, chunk=5) == retrieval_metrics(texts, images, caption_image)


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(1)
    images = unit(rng.standard_normal((200, 64)))
    texts = unit(rng.standard_normal((1000, 64)))
    metrics = retrieval_metrics(texts, images, np.repeat(np.arange(200), 5))
    assert metrics["t2i"]["R@10"] < 10.0  # chance is 5%
    assert 0 < mean_recall(metrics) < 15
