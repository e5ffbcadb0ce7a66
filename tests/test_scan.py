"""Which files an `index` run reads and which indexed items it may drop: links (inside, outside,
same file twice, dangling, loops), special files, unreadable files and folders, the removal
guard (--prune), a missing folder, and the roots recorded in the manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import random_image
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images
from mmretrieve.index.store import IndexStore


class MeanColour:
    """A picklable preprocessor: an image becomes its 8 coarse colour statistics."""

    def transform(self, image):
        pixels = np.asarray(image.convert("RGB").resize((2, 2)), dtype=np.float32).reshape(-1)
        return np.concatenate([pixels[:8] + 1.0])


class FakeEmbedder:
    """Deterministic and fast: the index machinery needs only these attributes."""

    ref = path = "fake-scan-model"
    fingerprint = "fake-scan-model-1"
    embed_dim = 8
    image_preprocessor = MeanColour()

    def embed_pixels(self, pixels):
        vectors = np.asarray(pixels, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build(root, index_dir, **options):
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return index_images(root, index_dir, FakeEmbedder(), **options)


def indexed(index_dir) -> set[str]:
    store = IndexStore.open(index_dir)
    try:
        return set(store.known_files())
    finally:
        store.close()


def photos(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(start, start + count):
        random_image(n).save(folder / f"img{n:02d}.png")
    return folder


# -- manifest roots --------------------------------------------------------------------------
def test_manifest_lists_each_indexed_root_once_resolved(tmp_path):
    first, second = photos(tmp_path / "a", 2), photos(tmp_path / "b", 1, start=5)
    os.symlink(first, tmp_path / "alias")
    build(tmp_path / "alias", tmp_path / "idx")
    build(second, tmp_path / "idx")
    build(first, tmp_path / "idx")  # the same folder by its real name: no new entry, nothing to publish
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["roots"] == [str(first.resolve()), str(second.resolve())]
