"""Searching an index: the encoder and the FAISS index load once; results carry their metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import IndexDamagedError, InputError
from .damage import index_damaged, relative_to as _relative
from .store import IndexStore, Item, read_manifest, store_name


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
    """A read-only view of an index folder plus the model that built it.

    ``mmap``: map the published vectors read-only instead of reading them into memory. A one-shot
    search (the CLI's) then starts sooner: on 7k 896-d flat vectors, loading took ~2 ms instead of
    ~20 ms (allocating and copying 25 MB) and the first search was no slower. A long-lived reader
    (``serve``, the library) keeps its own copy, so a file changed on disk cannot reach it.
    """

    def __init__(self, index_dir: str | Path, model: str | None = None, runtime: str = "auto",
                 device: str | None = None, embedder=None, mmap: bool = False):
        self.folder = Path(index_dir)
        self.manifest = read_manifest(self.folder)
        self._model, self._runtime, self._device = model, runtime, device
        self._mmap = mmap
        self._embedder = embedder
        if embedder is not None:
            self._check_fingerprint(embedder)
        self.store: IndexStore | None = None  # the data folder being read, opened read-only
        self.generation = -1
        self.index = None
        self.refresh()

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def refresh(self) -> bool:
        """Load the newest published state if `mmretrieve index` has made one; True if it did.

        That is a new generation of the data folder being read, or, after `index --rebuild`
        pointed the manifest at a new data folder, that folder. The old state answers until the
        new one is loaded completely; if loading fails, it stays.
        """
        for attempt in range(3):
            manifest = read_manifest(self.folder)
            if self.store is not None and store_name(manifest, self.folder) == self.store.name:
                if self.store.generation == self.generation:
                    return False
                self.index, self.generation = self._load(self.store, manifest)
                self.manifest = {**manifest, "generation": self.generation, "index_type": self.index.kind}
                return True
            store = None
            try:
                if self._embedder is not None:
                    self._check_fingerprint(self._embedder, manifest)
                store = IndexStore(self.folder, manifest, readonly=True)
                index, generation = self._load(store, manifest)
            except InputError:
                if store is not None:
                    store.close()
                # A rebuild switched data folders (and deleted this one) while it was opened: look again.
                if attempt < 2 and read_manifest(self.folder).get("store") != manifest.get("store"):
                    continue
                raise
            old, self.store = self.store, store
            self.index, self.generation = index, generation
            self.manifest = {**manifest, "generation": generation, "index_type": index.kind}
            if old is not None:
                old.close()  # its files may be deleted already; what it had open stays readable until now
            return True
        return False

    def _load(self, store: IndexStore, manifest: dict[str, Any]) -> tuple[Any, int]:
        """The FAISS index of ``store``'s published generation, and that generation."""
        from .backends import load_index

        for attempt in range(3):
            generation = store.generation
            folder = store.vectors_folder(generation)
            where = _relative(folder, self.folder)
            if not folder.is_dir() and generation == 0:
                raise InputError(f"{self.folder} has no published vectors yet; run `mmretrieve index` to completion")
            try:
                if not folder.is_dir():
                    raise IndexDamagedError(f"{folder} is missing", f"the published generation's vectors ({where}) "
                                            f"are missing")
                return load_index(folder, mmap=self._mmap), generation
            except IndexDamagedError as exc:
                # A writer that published a newer generation meanwhile deletes this one: look again.
                if attempt < 2 and store.generation != generation:
                    continue
                problem = exc.problem if folder.name in exc.problem else f"{where}: {exc.problem}"
                raise index_damaged(self.folder, problem, manifest) from exc
        raise AssertionError("unreachable")  # the last attempt returns or raises

    @property
    def embedder(self):
        if self._embedder is None:
            from ..bundle import resolve_model_ref
            from ..runtime import load_embedder

            model = resolve_model_ref(self._model, built_with=self.manifest["model"], index_dir=self.folder)
            embedder = load_embedder(model, self._runtime, self._device)
            self._check_fingerprint(embedder)
            self._embedder = embedder
        return self._embedder

    def _check_fingerprint(self, embedder, manifest: dict[str, Any] | None = None) -> None:
        built_with = (manifest or self.manifest)["model"]
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

    def search_fused(self, image: Any, text: str, k: int = 10, fusion: str = "mean",
                     weights: str | Sequence[float] | None = None, fusion_bundle: str | Path | None = None,
                     min_score: float | None = None) -> list[Hit]:
        """Hits for one multimodal query: an example image refined by words ("like this, but at
        night"), both embedded by the index's model and fused by ``fusion`` into one query vector
        (``mmretrieve.fusion.query``); late-fused indexes pad it like any query."""
        from ..fusion.query import fused_query_vector

        vector = fused_query_vector(self.embedder, image, text, fusion, weights, fusion_bundle)
        return self.search_vectors(vector, k, min_score)[0]

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

