"""Fused items in an index: how an index stores, describes and refreshes items fused from an
image and its caption (the fusion itself is ``mmretrieve.fusion``).

Late fusion's item v = w_txt · f_txt + w_img · f_img has ‖v‖ ≤ 1 (see ``fusion.items``); it is
stored with one more coordinate, sqrt(1 − ‖v‖²), which makes it a unit vector like every other
stored vector (the usual reduction of inner-product search to cosine search), and queries carry 0
there (``LATE_EXTRA_DIMS``, recorded as the manifest's ``query_padding``). An image without a
caption keeps its image embedding alone (for late fusion, weighted), so it stays findable. The
manifest records the strategy (``describe_fusion``) and the captions file, so a later run without
--fusion refreshes the index the same way (``item_fusion_settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import IndexDamagedError, InputError
from ..fusion.items import fuse_items
from ..fusion.strategies import FusionStrategy
from .store import MANIFEST, read_manifest

LATE_EXTRA_DIMS = 1  # the completing coordinate of late-fused items; queries get 0 there


def complete_to_unit(vectors: np.ndarray) -> np.ndarray:
    """(n, d) rows of norm <= 1 -> (n, d + 1) unit rows with the same inner products against [q, 0]."""
    squared = np.clip(1.0 - np.einsum("ij,ij->i", vectors, vectors), 0.0, None)
    return np.concatenate([vectors, np.sqrt(squared)[:, None]], axis=1).astype(np.float32)


def extra_dims(strategy: FusionStrategy | None) -> int:
    return LATE_EXTRA_DIMS if strategy is not None and strategy.late else 0


def fuse_with_captions(strategy: FusionStrategy, embedder, image_vectors: np.ndarray,
                       captions: Sequence[list[str] | None]) -> tuple[np.ndarray, int]:
    """Image vectors of one batch fused with their first captions, as stored in the index (late:
    completed to unit rows); returns (vectors, how many had no caption)."""
    vectors = np.array(image_vectors, dtype=np.float32)
    rows = [n for n, caps in enumerate(captions) if caps]
    if rows:
        texts = embedder.embed_texts([captions[n][0] for n in rows])
        vectors[rows] = fuse_items(strategy, np.asarray(texts, dtype=np.float32), vectors[rows])
    alone = sorted(set(range(len(vectors))) - set(rows))
    if strategy.late:
        vectors[alone] *= np.float32(strategy.weights[1])
        vectors = complete_to_unit(vectors)
    return vectors, len(alone)


def fusion_label(description: dict[str, Any] | None) -> str:
    """How an index's fusion reads in a message, e.g. 'items fused with mean (weights 0.5, 0.5)'."""
    if not description:
        return "images only (no fusion)"
    label = f"items fused with {description['strategy']}"
    if description.get("weights"):
        label += f" (weights {', '.join(f'{w:g}' for w in description['weights'])})"
    if description.get("head_digest"):
        label += f" (head {description['head_digest'][:12]})"
    return label


def item_fusion_settings(index_dir: str | Path, embedder, captions_file: str | Path | None, fusion: str | None,
                         weights: str | Sequence[float] | None, fusion_bundle: str | Path | None,
                         rebuild: bool = False):
    """(captions {image path: captions} or None, strategy or None, captions source) for a run.

    An index built with fusion keeps it: a later run without --fusion reuses the strategy, its
    weights and the captions file recorded in the manifest, so `mmretrieve index PATH` updates it.
    """
    from ..fusion.resolve import resolve_fusion

    try:
        manifest = read_manifest(Path(index_dir)) if (Path(index_dir) / MANIFEST).is_file() else {}
    except IndexDamagedError:
        if not rebuild:
            raise
        manifest = {}  # --rebuild recovers a damaged manifest: nothing of it is reused
    built_with = manifest.get("fusion")
    if fusion is None and (weights is not None or fusion_bundle is not None):
        raise InputError("--weights and --fusion-bundle go with --fusion")
    if fusion is None and built_with:
        fusion = built_with["strategy"]
        weights = built_with.get("weights")
        if built_with.get("head_digest"):  # the model's own head first, else the bundle that built the index
            from ..fusion.store import attached_heads

            own = attached_heads(getattr(embedder, "path", embedder.ref))
            fusion_bundle = None if fusion in own else manifest.get("fusion_bundle")
    if built_with and captions_file is None:
        captions_file = manifest.get("captions")
        if not captions_file or not Path(captions_file).exists():
            raise InputError(f"{index_dir} fuses images with the captions of {captions_file}, which is gone; "
                             f"give --captions FILE")
    strategy = None
    if fusion is not None:
        if captions_file is None:
            raise InputError(f"--fusion {fusion} joins each image with its caption; give --captions FILE "
                             f"(JSONL, CSV, COCO JSON or .txt sidecars)")
        strategy = resolve_fusion(embedder, fusion, weights, fusion_bundle)
    captions = None
    if captions_file is not None:
        from ..data import load_captions

        captions = {str(item.image.resolve()): item.captions
                    for item in load_captions(captions_file, check_images=False).items}
    source = str(Path(captions_file).resolve()) if captions_file is not None else None
    return captions, strategy, source


def describe_fusion(strategy: FusionStrategy) -> dict[str, Any]:
    """What an index records to know which fusion built its vectors."""
    weights = getattr(strategy, "weights", None)
    return {"strategy": strategy.name,
            "weights": None if weights is None else [round(float(w), 6) for w in weights],
            "head_digest": getattr(strategy, "digest", None)}
