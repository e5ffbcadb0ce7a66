"""The library API: the same operations as the CLI, from Python.

    import mmretrieve.api as mm
    index = mm.open_index("index/images")                  # model taken from the index
    for hit in index.search("a dog running on the beach", k=5):
        print(hit.score, hit.path)
    index.update("./photos")                                # add new, re-embed changed, drop vanished
    index.remove(["./photos/old.jpg"])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .index.builder import IndexReport, index_images, index_texts, remove_files
from .index.search import Hit, IndexReader

INDEX_ROOT_ENV = "MMRETRIEVE_INDEX_ROOT"


def default_index_dir(modality: str = "image") -> Path:
    """``index/images`` or ``index/texts`` under $MMRETRIEVE_INDEX_ROOT (default ./index)."""
    return Path(os.environ.get(INDEX_ROOT_ENV, "index")) / ("images" if modality == "image" else "texts")


class Index:
    """An index folder with its model: search it, and keep it in step with a folder."""

    def __init__(self, index_dir: str | Path, model: str | None = None, runtime: str = "auto",
                 device: str | None = None):
        self.folder = Path(index_dir)
        self.reader = IndexReader(self.folder, model=model, runtime=runtime, device=device)

    def search(self, query: str, k: int = 10, min_score: float | None = None) -> list[Hit]:
        return self.reader.search_text([query], k, min_score)[0]

    def search_image(self, image: str | Path | Any, k: int = 10, min_score: float | None = None) -> list[Hit]:
        return self.reader.search_image([image], k, min_score)[0]

    def update(self, root: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
               **options: Any) -> IndexReport:
        report = index_images(root, self.folder, self.reader.embedder, tuple(include), tuple(exclude), **options)
        self.reader.refresh()
        return report

    def add(self, paths: Sequence[str | Path], **options: Any) -> list[IndexReport]:
        reports = [index_images(path, self.folder, self.reader.embedder, **options) for path in paths]
        self.reader.refresh()
        return reports

    def remove(self, paths: Sequence[str | Path]) -> int:
        removed = remove_files(self.folder, list(paths))
        self.reader.refresh()
        return removed

    def __len__(self) -> int:
        return self.reader.store.count()


def open_index(index_dir: str | Path | None = None, model: str | None = None, runtime: str = "auto",
               device: str | None = None) -> Index:
    return Index(index_dir or default_index_dir("image"), model, runtime, device)


def build_index(root: str | Path, model: str, index_dir: str | Path | None = None, runtime: str = "auto",
                device: str | None = None, **options: Any) -> Index:
    """Create (or update) an image index for a folder with a model, and open it."""
    from .runtime import load_embedder

    folder = Path(index_dir or default_index_dir("image"))
    embedder = load_embedder(model, runtime, device)
    index_images(root, folder, embedder, **options)
    index = Index.__new__(Index)
    index.folder = folder
    index.reader = IndexReader(folder, embedder=embedder)
    return index


def build_text_index(captions_file: str | Path, model: str, index_dir: str | Path | None = None,
                     runtime: str = "auto", device: str | None = None, **options: Any) -> IndexReport:
    from .runtime import load_embedder

    return index_texts(captions_file, index_dir or default_index_dir("text"), load_embedder(model, runtime, device),
                       **options)
