"""Recall@K under the CLIP_benchmark protocol, on hand-made embeddings with known ranks."""

import numpy as np
import pytest

from mmretrieve.fusion import create_fusion
from mmretrieve.fusion.embeddings import CaptionedEmbeddings
from mmretrieve.fusion.evaluation import evaluate_fusion
from mmretrieve.metrics import mean_recall, ranks_of_best_hit, ranks_of_truth, retrieval_metrics, summarise


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


# -- ties count against the query ------------------------------------------------------------------
N_IMAGES, CAPTIONS = 20, 5


@pytest.mark.parametrize("value", [1.0, 0.0], ids=["identical", "all-zero"])
def test_embeddings_that_cannot_tell_items_apart_score_no_better_than_chance(value):
    """Every score ties, so every correct item ranks behind all the incorrect ones: a caption's
    image is 20th of 20, an image's best caption 96th of 100 (its own 5 captions do not count)."""
    images = np.full((N_IMAGES, 8), value, dtype=np.float32)
    texts = np.full((N_IMAGES * CAPTIONS, 8), value, dtype=np.float32)
    metrics = retrieval_metrics(texts, images, np.repeat(np.arange(N_IMAGES), CAPTIONS), ks=(1, 5, 10, 20, 96))
    assert metrics["t2i"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@20": 100.0, "R@96": 100.0, "median_rank": 20.0}
    assert metrics["i2t"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@20": 0.0, "R@96": 100.0, "median_rank": 96.0}
    assert mean_recall(retrieval_metrics(texts, images, np.repeat(np.arange(N_IMAGES), CAPTIONS))) == 0.0


def test_a_tie_with_one_wrong_item_costs_one_rank_and_ties_among_correct_items_cost_nothing():
    scores = np.array([[0.5, 0.5, 0.1, 0.9],    # best correct (col 0) ties col 1 and trails col 3 -> 3
                       [0.7, 0.7, 0.7, 0.2]])   # cols 0 and 1 correct and tied, col 2 ties them -> 2
    correct = np.array([[True, False, False, False], [True, True, False, False]])
    assert ranks_of_best_hit(scores, correct).tolist() == [3, 2]
    assert ranks_of_truth(scores, np.array([1, 3])).tolist() == [3, 4]  # 0.5 ties col 0, trails col 3; 0.2 is last


def test_nan_scores_rank_last():
    scores = np.array([[np.nan, 0.1, 0.2], [0.3, np.nan, np.nan], [np.nan, np.nan, np.nan]])
    assert ranks_of_truth(scores, np.array([0, 0, 2])).tolist() == [3, 1, 3]


def test_without_ties_the_ranks_are_those_of_a_plain_sort():
    """Float embeddings almost never tie, so published numbers do not move: on random vectors the
    metrics equal those from sorting each row (the optimistic and pessimistic rules agree)."""
    rng = np.random.default_rng(2)
    images = unit(rng.standard_normal((60, 16)))
    texts = unit(rng.standard_normal((300, 16)))
    owners = np.repeat(np.arange(60), 5)
    order = np.argsort(-(texts @ images.T), axis=1, kind="stable")
    t2i = 1 + np.argmax(order == owners[:, None], axis=1)
    i2t_order = np.argsort(-(images @ texts.T), axis=1, kind="stable")
    i2t = 1 + np.argmax(owners[i2t_order] == np.arange(60)[:, None], axis=1)
    metrics = retrieval_metrics(texts, images, owners, ks=(1, 5, 10, 30))
    assert metrics == {"t2i": summarise(t2i, (1, 5, 10, 30)), "i2t": summarise(i2t, (1, 5, 10, 30))}
    assert 0 < metrics["t2i"]["R@10"] < 100 and metrics["i2t"]["median_rank"] > 1


def test_fused_items_use_the_same_rule():
    """eval --fused ranks items with the same function: identical embeddings score 0, not 100."""
    images = np.ones((N_IMAGES, 8), dtype=np.float32)
    owners = np.repeat(np.arange(N_IMAGES), CAPTIONS)
    table = evaluate_fusion(CaptionedEmbeddings(images, np.ones((len(owners), 8), np.float32), owners),
                            {"mean": create_fusion("mean", weights=(0.5, 0.5))})
    assert table == {row: {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0} for row in ("image-only", "text-only", "mean")}
