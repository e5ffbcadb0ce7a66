"""Index bookkeeping that scales (issue 17, items 4 and 5): staging a batch and publishing look
up only what changed, through indexes; items.sqlite holds each folder once and no embeddings;
an index in the layout before (format 2 and 1) is read as it is, migrated in place by the next
writer, and searches and verifies the same after."""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image
from fakes import ColourEmbedder
from mmretrieve.index import store as store_module
from mmretrieve.index.builder import index_images
from mmretrieve.index.catalogue import Catalogue
from mmretrieve.index.search import IndexReader
from mmretrieve.index.store import IndexStore, Item, ids_by_path, items_with_ids, path_bounds
from mmretrieve.index.verify import verify_index

FakeEmbedder = functools.partial(ColourEmbedder, "fake-scaling-model", 12)
DIM = 8


def build(root, index_dir, **options):
    return index_images(root, index_dir, FakeEmbedder(), workers=0, progress=False, **options)


def unit(rng, n):
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def photo(n: int) -> str:
    return f"/photos/{2000 + n // 500}/event-{n // 50:04d}/IMG_{n:06d}.jpg"


def filled_store(folder: Path, size: int) -> IndexStore:
    """A store with ``size`` published synthetic items (no FAISS folder: SQLite's side only)."""
    rng = np.random.default_rng(size)
    store = IndexStore.create(folder, {"modality": "image", "model": {"ref": "x", "path": "x", "fingerprint": "0"},
                                       "embed_dim": DIM})
    store.stage([Item(0, photo(n), 100 + n, n, f"{n:064x}", 640, 480) for n in range(size)], unit(rng, size))
    store.publish(1, [], "flat", {})
    store.activate()
    return store


def vm_steps(db, action) -> int:
    """SQLite virtual-machine steps ``action`` costs (a full-table read costs steps per row)."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    db.set_progress_handler(count, 1)
    try:
        action()
    finally:
        db.set_progress_handler(None, 0)
    return steps[0]


def batch_work(store: IndexStore, seed: int) -> tuple[int, int]:
    """Steps of staging one batch of 32 (24 new files, 8 changed ones) and of publishing it."""
    rng = np.random.default_rng(seed)
    size = store.count()
    numbers = [10_000_000 + seed * 100 + n for n in range(24)] + [int(n) for n in rng.integers(0, size, 8)]
    items = [Item(0, photo(n), 1, 2, None, 3, 4) for n in numbers]
    stage = vm_steps(store.db._db, lambda: store.stage(items, unit(rng, 32)))
    removed = [photo(int(n)) for n in rng.integers(0, size, 2)]
    publish = vm_steps(store.db._db, lambda: store.publish(store.generation + 1, removed, "flat", {}))
    return stage, publish


def test_staging_and_publishing_a_batch_cost_the_same_in_a_small_and_a_large_index(tmp_path):
    small, large = filled_store(tmp_path / "small", 200), filled_store(tmp_path / "large", 8_000)
    try:
        small_stage, small_publish = batch_work(small, 1)
        large_stage, large_publish = batch_work(large, 1)
        # A statement that read every published row would cost 40x more in the large index.
        assert large_stage < 1.5 * small_stage
        # Publishing counts the items (SQLite's count is the truth), a pass over the smallest
        # index of the table; everything else it does is proportional to the batch.
        count_steps = vm_steps(large.db._db, large.count) - vm_steps(small.db._db, small.count)
        assert large_publish - count_steps < 1.5 * small_publish
        assert large.count() == 8_000 + 24 - 2 and small.count() == 200 + 24 - 2
    finally:
        small.close()
        large.close()


@pytest.mark.parametrize("query, parameters", [
    ("ids_by_path", ["/photos/2000/event-0001/IMG_000060.jpg", "/photos/2000/event-0009/IMG_000499.jpg"]),
    ("items_with_ids", [3, 77]),
])
def test_item_lookups_search_through_indexes(tmp_path, query, parameters):
    store = filled_store(tmp_path / "idx", 500)
    try:
        plans = []
        store.db._db.set_trace_callback(plans.append)
        found = {"ids_by_path": ids_by_path, "items_with_ids": items_with_ids}[query](store.db, parameters)
        store.db._db.set_trace_callback(None)
        assert len(found) == 2
        statements = [sql for sql in plans if sql.lstrip().upper().startswith(("SELECT", "WITH"))]
        details = [row[3] for sql in statements for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
        tables = {"t", "i", "items", "f", "folders"}
        assert not [d for d in details if d.startswith("SCAN ") and d.split()[1] in tables], details
        assert any(d.startswith("SEARCH") for d in details)
    finally:
        store.close()


def test_items_sqlite_holds_each_folder_once_and_no_embeddings(tmp_path):
    store = filled_store(tmp_path / "idx", 2_000)
    try:
        folders = store.db.execute("SELECT COUNT(*) FROM folders").fetchone()[0]
        columns = {row[1] for row in store.db.execute("PRAGMA table_info(items)")}
        assert folders == 2_000 // 50 and "embedding" not in columns and "path" not in columns
        assert store.embedding_file().rows == 2_000 and store.embedding_file().path.stat().st_size == 2_000 * DIM * 4
        size = (store.data_folder / "items.sqlite").stat().st_size
        assert size / 2_000 < 200  # bytes per item: each row, its entry in the path index, free pages given back
        assert path_bounds(store.db) == (photo(0), photo(1_999))
    finally:
        store.close()


def test_replaced_rows_of_the_embeddings_file_are_compacted_away(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_MIN_ROWS", 10)
    store = filled_store(tmp_path / "idx", 30)
    rng = np.random.default_rng(5)
    try:
        for round_ in range(3):  # every item changes: its old row is named by nothing
            vectors = unit(rng, 30)
            store.stage([Item(0, photo(n), round_, 1) for n in range(30)], vectors)
            store.publish(store.generation + 1, [], "flat", {})
        ids, stored = store.all_embeddings()
        assert np.array_equal(stored, vectors) and ids.tolist() == list(range(1, 31))
        assert store.embedding_file().rows <= 2 * 30 + 10
        assert store.embedding_problems() == (30, [])
        # The replaced files stay, whole, for readers that read their names before the switch ...
        current = store.embedding_file().path.name
        older = sorted(p for p in store.data_folder.glob("embeddings-*.f32") if p.name != current)
        assert older and all(p.stat().st_size % (4 * store.embedding_file().dim) == 0 for p in older)
    finally:
        store.close()
    # ... until the next writer opens the index.
    store = IndexStore.open(tmp_path / "idx")
    try:
        assert [p.name for p in store.data_folder.glob("embeddings-*.f32")] == [current]
        assert np.array_equal(store.all_embeddings()[1], vectors)
    finally:
        store.close()


# -- indexes written in the layout before format 3 -------------------------------------------
OLD_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER, captions TEXT, text TEXT, image TEXT, embedding BLOB NOT NULL);
CREATE TABLE staged (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER, captions TEXT, text TEXT, image TEXT, embedding BLOB NOT NULL);
CREATE TABLE failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT);
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT);
"""


def make_old_layout(index_dir: Path) -> None:
    """Rewrite an index's database as mmretrieve wrote it before format 3 (the SQL above): each
    row with its path and embedding, no embeddings file; manifest format_version 2."""
    with IndexStore.open(index_dir, readonly=True) as store:
        data = store.data_folder
        ids, vectors = store.all_embeddings()
        items = store.items_by_id(ids)
        failures = store.db.execute("SELECT path, size, mtime_ns, reason FROM failures").fetchall()
        info = store.db.execute("SELECT key, value FROM info WHERE key != 'embeddings'").fetchall()
    for path in [*data.glob("items.sqlite*"), *data.glob("embeddings-*.f32")]:
        path.unlink()
    with sqlite3.connect(data / "items.sqlite") as db:
        db.executescript(OLD_SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(i, items[i].path, items[i].size, items[i].mtime_ns, items[i].sha256, items[i].width,
                         items[i].height, json.dumps(items[i].captions) if items[i].captions else None,
                         items[i].text, items[i].image, vector.tobytes()) for i, vector in zip(ids.tolist(), vectors)])
        db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?)", failures)
        db.executemany("INSERT INTO info VALUES (?, ?)", info)
    db.close()
    manifest = json.loads((index_dir / "manifest.json").read_text())
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for n in range(10):
        random_image(n, size=(16, 12)).save(folder / ("trip" if n % 2 else ".") / f"img{n:02d}.png")
    return folder


def results(index_dir, queries):
    reader = IndexReader(index_dir, embedder=FakeEmbedder())
    try:
        hits = reader.search_vectors(queries, k=6)
        return [[(Path(h.path).name, round(float(h.score), 5)) for h in row] for row in hits]
    finally:
        reader.close()


def move_to_format_1(index_dir: Path) -> None:
    """An index as written before data folders: its data in the index folder, no "store"."""
    data = next(index_dir.glob("data-*"))
    for entry in data.iterdir():
        entry.rename(index_dir / entry.name)
    data.rmdir()
    manifest = json.loads((index_dir / "manifest.json").read_text())
    del manifest["store"]
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


@pytest.mark.parametrize("format_version", [2, 1])
def test_an_old_layout_index_is_read_migrated_by_the_next_run_and_searches_the_same(photos, tmp_path, format_version):
    index_dir, fresh_dir = tmp_path / "idx", tmp_path / "fresh"
    build(photos, index_dir)
    queries = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    before = results(index_dir, queries)
    make_old_layout(index_dir)
    if format_version == 1:
        move_to_format_1(index_dir)
    data = next(index_dir.glob("data-*")) if format_version == 2 else index_dir

    # Read as it is: search, the serve catalogue and verify, nothing written.
    assert results(index_dir, queries) == before
    catalogue = Catalogue(index_dir)
    some = catalogue.lookup(1)
    assert some is not None and catalogue.ids_for_paths([some.path]) == {some.path: 1}
    assert catalogue.common_folder() == str(photos.resolve())
    catalogue.close()
    assert verify_index(index_dir).ok
    assert not list(data.glob("embeddings-*.f32"))

    # The next run migrates it in place, then updates it: the same answers as an index built anew.
    random_image(50, size=(16, 12)).save(photos / "trip" / "new.png")
    (photos / "img00.png").unlink()
    report = build(photos, index_dir)
    assert (report.added, report.removed, report.total) == (1, 1, 10)
    columns = {row[1] for row in sqlite3.connect(data / "items.sqlite").execute("PRAGMA table_info(items)")}
    assert "path" not in columns and "embedding" not in columns
    assert json.loads((index_dir / "manifest.json").read_text())["format_version"] == store_module.FORMAT_VERSION
    report = verify_index(index_dir)
    assert report.ok, report.lines()
    build(photos, fresh_dir)
    assert results(index_dir, queries) == results(fresh_dir, queries)
    catalogue = Catalogue(index_dir)
    assert catalogue.common_folder() == str(photos.resolve())
    catalogue.close()


def test_a_migration_killed_before_its_commit_leaves_the_old_layout_whole(photos, tmp_path, monkeypatch):
    index_dir = tmp_path / "idx"
    build(photos, index_dir)
    queries = np.eye(12, dtype=np.float32)[:3]
    before = results(index_dir, queries)
    make_old_layout(index_dir)

    def killed(path):
        raise SystemExit(137)

    monkeypatch.setattr(store_module, "split_path", killed)  # dies inside the migration's transaction
    with pytest.raises(SystemExit):
        IndexStore.open(index_dir)
    monkeypatch.undo()
    data = next(index_dir.glob("data-*"))
    columns = {row[1] for row in sqlite3.connect(data / "items.sqlite").execute("PRAGMA table_info(items)")}
    assert "embedding" in columns and results(index_dir, queries) == before and verify_index(index_dir).ok
    # The embeddings file the killed migration wrote is replaced by the next one.
    IndexStore.open(index_dir).close()
    assert [p.name for p in data.glob("embeddings-*.f32")] == ["embeddings-000001.f32"]
    assert results(index_dir, queries) == before and verify_index(index_dir).ok


def test_verify_finds_an_item_whose_embedding_row_is_missing(photos, tmp_path):
    index_dir = tmp_path / "idx"
    build(photos, index_dir)
    data = next(index_dir.glob("data-*"))
    with sqlite3.connect(data / "items.sqlite") as db:
        db.execute("UPDATE items SET slot = 999 WHERE id = (SELECT MIN(id) FROM items)")
    db.close()
    problems = {check.name: check.detail for check in verify_index(index_dir).problems}
    assert "1 items name rows past the end of embeddings-000001.f32, which holds 10" in problems["embeddings"]
