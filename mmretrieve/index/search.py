"""Searching an index: the encoder and the FAISS index load once; results carry their metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .store import IndexStore, Item, read_manifest


@dataclass
class Hit:
    rank: int
    score: float
    item: Item

    @property
    def path(self) -> str:
        return self.item.path

    def as_dict(self) -> dict[str, Any]:
        data = {"rank": self.rank, "score": round(self.score, 6), **self.item.as_dict()}
        if self.item.text is not None:  # a caption: its key is internal, its image is what users want
            data["path"] = self.item.image
        return data


class IndexReader:
    """A read-only view of an index folder plus the model that built it."""

    def __init__(self, index_dir: str | Path, model: str | None = None, runtime: str = "auto",
                 device: str | None = None, embedder=None):
        self.folder = Path(index_dir)
        self.manifest = read_manifest(self.folder)
        self.store = IndexStore(self.folder, self.manifest)
        self._model, self._runtime, self._device = model, runtime, device
        self._embedder = embedder
        if embedder is not None:
            self._check_fingerprint(embedder)
        self.generation = -1
        self.index = None
        self.refresh()

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def refresh(self) -> bool:
        """Load the newest published generation if `mmretrieve index` has made one; True if it did."""
        from .backends import load_index

        generation = self.store.generation
        if generation == self.generation:
            return False
        folder = self.store.vectors_folder(generation)
        if not folder.is_dir():
            raise InputError(f"{self.folder} has no published vectors yet; run `mmretrieve index` to completion")
        self.index = load_index(folder)
        self.generation = generation
        self.manifest = read_manifest(self.folder)
        return True

    @property
    def embedder(self):
        if self._embedder is None:
            from ..runtime import load_embedder

            built_with = self.manifest["model"]
            embedder = load_embedder(self._model or _model_location(built_with), self._runtime, self._device)
            self._check_fingerprint(embedder)
            self._embedder = embedder
        return self._embedder

    def _check_fingerprint(self, embedder) -> None:
        built_with = self.manifest["model"]
        if embedder.fingerprint != built_with["fingerprint"]:
            raise InputError(
                f"{self.folder} was built with model {built_with['ref']} (fingerprint {built_with['fingerprint'][:12]}), "
                f"but {embedder.ref} has fingerprint {embedder.fingerprint[:12]}; search with the model that built it, "
                f"or re-index with `mmretrieve index PATH --model {embedder.ref} --rebuild`"
            )

    def search_vectors(self, queries: np.ndarray, k: int = 10, min_score: float | None = None) -> list[list[Hit]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a whole number of at least 1, not {k!r}")
        k = min(int(k), max(len(self.index), 1))  # more than the index holds would only allocate padding
        queries = np.asarray(queries, dtype=np.float32)
        padding = int(self.manifest.get("query_padding", 0))  # late-fused items carry extra coordinates
        if padding:
            queries = np.concatenate([queries, np.zeros((len(queries), padding), np.float32)], axis=1)
        scores, ids = self.index.search(np.ascontiguousarray(queries), k)
        items = self.store.items_by_id(i for i in ids.ravel() if i >= 0)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, id_ in zip(row_scores, row_ids):
                if id_ < 0 or id_ not in items or (min_score is not None and score < min_score):
                    continue
                hits.append(Hit(len(hits) + 1, float(score), items[int(id_)]))
            results.append(hits)
        return results

    def search_text(self, texts: Sequence[str], k: int = 10, min_score: float | None = None) -> list[list[Hit]]:
        texts = list(texts)
        if not texts or any(not t.strip() for t in texts):
            raise InputError("a text query must not be empty")
        return self.search_vectors(self.embedder.embed_texts(texts), k, min_score)

    def search_image(self, images: Sequence, k: int = 10, min_score: float | None = None) -> list[list[Hit]]:
        return self.search_vectors(self.embedder.embed_images(list(images)), k, min_score)

    def close(self) -> None:
        self.store.close()


def _model_location(built_with: dict[str, Any]) -> str:
    """The registered name if it still resolves (e.g. `default`), else the bundle path."""
    ref = built_with.get("ref", "")
    if Path(ref).is_dir():
        return ref
    from ..plugins import get_host

    if ref in get_host().registry("model"):
        return ref
    return built_with.get("path", ref)
