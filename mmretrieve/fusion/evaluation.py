"""Recall of fused items: each image plus one of its captions is an item, the other captions query it.

Image-only and text-only rows rank the same items by one modality, so every row of the table
answers the same question and the strategies can be read against both baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..metrics import KS, ranks_of_truth, recall_at_k
from .embeddings import CaptionedEmbeddings
from .strategies import FusionStrategy
from .training import caption_table


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


def evaluate_fusion(embeddings: CaptionedEmbeddings, strategies: dict[str, FusionStrategy],
                    item_caption: int = 0, chunk: int = 2048, ks=KS) -> dict[str, dict[str, float]]:
    """{row name: {R@1, R@5, R@10}} for image-only, text-only and each strategy; a query's rank
    is ``metrics.ranks_of_truth`` (ties count against it), the same rule as ``mmretrieve eval``."""
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
        ranks = [ranks_of_truth(score(query_vectors[s:s + chunk]), truth[s:s + chunk])
                 for s in range(0, len(truth), chunk)]
        table[name] = recall_at_k(np.concatenate(ranks), ks)
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per strategy."""
    columns = list(next(iter(table.values())))
    lines = ["| items ranked by | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |" for name, row in table.items()]
    return "\n".join(lines)


def strategies_for(embedder, weights=None, fusion_bundles: Sequence[str | Path] = ()) -> tuple[dict, list[str]]:
    """Every registered strategy that can run on ``embedder``'s model: the untrained ones with
    ``weights``, the trained ones whose head is given or stored in the model. Returns
    (strategies by name, one note per trained strategy left out for want of a head)."""
    from . import list_fusion_strategies
    from .resolve import fusion_spec, resolve_fusion
    from .store import read_fusion_info

    given: dict[str, Path] = {}
    for folder in fusion_bundles:
        name = fusion_spec(read_fusion_info(folder)["strategy"]).name
        if name in given:
            raise InputError(f"two fusion bundles for {name} ({given[name]} and {folder}); give one per strategy")
        given[name] = Path(folder)
    strategies, skipped = {}, []
    for name in sorted(list_fusion_strategies(), key=lambda n: (fusion_spec(n).trainable, n)):  # untrained first
        spec = fusion_spec(name)
        if not spec.trainable:
            strategies[name] = resolve_fusion(embedder, name, weights, one_vector=False)
            continue
        try:
            strategies[name] = resolve_fusion(embedder, name, None, given.get(name))
        except ConfigError as exc:
            if name in given:
                raise
            skipped.append(str(exc))
    return strategies, skipped


def evaluate_fused_items(embedder, items, weights=None, fusion_bundles: Sequence[str | Path] = (),
                         batch_size: int = 64, workers: int = 0, progress: bool = True):
    """The fused-item table (image-only, text-only, each strategy) of a captioned set, through any
    runtime's embedder; returns (table, skipped notes)."""
    from ..evaluate import caption_owners, embed_with_embedder
    from .embeddings import CaptionedEmbeddings

    strategies, skipped = strategies_for(embedder, weights, fusion_bundles)  # refuse bad settings before embedding
    images, texts = embed_with_embedder(embedder, items, batch_size, workers, progress)
    table = evaluate_fusion(CaptionedEmbeddings(images, texts, caption_owners(items)), strategies)
    return table, skipped
