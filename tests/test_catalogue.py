"""index.catalogue: the read-only item lookups the HTTP service uses instead of its own SQL."""

from __future__ import annotations

import functools
import os
import pathlib

import pytest

from conftest import random_image
from fakes import ColourEmbedder
from mmretrieve.errors import IndexDamagedError
from mmretrieve.index.builder import index_images
from mmretrieve.index.catalogue import Catalogue, indexed_roots
from mmretrieve.index.store import database_path, read_manifest


FakeEmbedder = functools.partial(ColourEmbedder, "fake-catalogue-model", 12)


@pytest.fixture
def index_dir(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for n in range(3):
        random_image(n, size=(16, 12)).save(photos / ("sub" if n == 2 else ".") / f"img{n}.png")
    index_images(photos, tmp_path / "idx", FakeEmbedder(), workers=0, progress=False)
    return tmp_path / "idx"


def test_lookups_by_id_and_path(index_dir, tmp_path):
    database = database_path(index_dir)
    before = (database.read_bytes(), database.stat().st_mtime_ns)
    catalogue = Catalogue(index_dir)
    try:
        photos = os.path.realpath(tmp_path / "photos")
        wanted = [os.path.join(photos, "img0.png"), os.path.join(photos, "sub", "img2.png"), "/not/indexed.png"]
        ids = catalogue.ids_for_paths(wanted)
        assert sorted(ids) == sorted(wanted[:2])
        item = catalogue.lookup(ids[wanted[1]])
        assert item.path == wanted[1] and item.id == ids[wanted[1]] and len(item.sha256) == 64
        assert catalogue.lookup(max(ids.values()) + 1000) is None
        assert catalogue.common_folder() == photos
        assert indexed_roots(read_manifest(index_dir)) == (photos,)
        assert indexed_roots({"roots": ["relative/x", 3]}) == ()
    finally:
        catalogue.close()
    assert (database.read_bytes(), database.stat().st_mtime_ns) == before  # read-only


def test_a_damaged_database_is_one_sentence(index_dir):
    database = database_path(index_dir)
    for name in os.listdir(database.parent):  # the WAL and its index go too: only the damaged file remains
        if name.startswith(database.name + "-"):
            os.remove(database.parent / name)
    database.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexDamagedError, match=r"^the index .* is damaged: .*items.sqlite cannot be read .*; "
                                                r"rebuild it with `mmretrieve index .* --rebuild`$"):
        Catalogue(index_dir)


def test_the_service_writes_no_sql_against_the_index_schema():
    import mmretrieve

    serve = pathlib.Path(mmretrieve.__file__).parent / "serve"
    holding = sorted(path.name for path in serve.glob("*.py")
                     if any(table in path.read_text() for table in ("FROM items", "FROM staged", "FROM info")))
    assert holding == []
