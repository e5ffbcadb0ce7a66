"""Recall of fused items: each image plus one of its captions is an item, the other captions query it.

Image-only and text-only rows rank the same items by one modality, so every row of the table
answers the same question and the strategies can be read against both baselines.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .embeddings import CaptionedEmbeddings
from .strategies import FusionStrategy
from .training import caption_table

KS = (1, 5, 10)


def split_items_and_queries(embeddings: CaptionedEmbeddings, item_caption: int = 0):
    """(item caption per image, query caption indices, each query's image); images with one caption
    give an item but no query."""
    captions = caption_table(embeddings.owners, len(embeddings.images))
    if any(len(own) == 0 for own in captions):
        raise InputError("every image needs a caption to form a fused item")
    items = np.asarray([own[min(item_caption, len(own) - 1)] for own in captions])
    queries = np.setdiff1d(np.arange(len(embeddings.texts)), items)
    if len(queries) == 0:
        raise InputError("no captions are left as queries: each image needs two or more captions")
    return items, queries, embeddings.owners[queries]


def recall_at(scores: np.ndarray, truth: np.ndarray, ks=KS) -> dict[str, float]:
    """Percent of queries whose own item ranks in the top k (ties count against it)."""
    correct = scores[np.arange(len(truth)), truth]
    ranks = (scores > correct[:, None]).sum(axis=1) + (scores == correct[:, None]).sum(axis=1) - 1
    return {f"R@{k}": float(100.0 * (ranks < k).mean()) for k in ks}


def evaluate_fusion(embeddings: CaptionedEmbeddings, strategies: dict[str, FusionStrategy],
                    item_caption: int = 0, chunk: int = 2048) -> dict[str, dict[str, float]]:
    """{row name: {R@1, R@5, R@10}} for image-only, text-only and each strategy."""
    items, queries, truth = split_items_and_queries(embeddings, item_caption)
    item_text, item_image = embeddings.texts[items], embeddings.images
    query_vectors = embeddings.texts[queries]
    scorers = {"image-only": lambda q: q @ item_image.T, "text-only": lambda q: q @ item_text.T}
    for name, strategy in strategies.items():
        if strategy.late:
            scorers[name] = lambda q, s=strategy: s.scores(q, item_text, item_image)
        else:
            fused = strategy.fuse(item_text, item_image)
            scorers[name] = lambda q, f=fused: q @ f.T
    table = {}
    for name, score in scorers.items():
        hits = [recall_at(score(query_vectors[s:s + chunk]), truth[s:s + chunk]) for s in range(0, len(truth), chunk)]
        sizes = [len(truth[s:s + chunk]) for s in range(0, len(truth), chunk)]
        table[name] = {k: float(np.average([h[k] for h in hits], weights=sizes)) for k in hits[0]}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per strategy."""
    columns = list(next(iter(table.values())))
    lines = ["| items ranked by | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |" for name, row in table.items()]
    return "\n".join(lines)
