"""The index never loses its published state: `--rebuild` fills a new data folder beside the old
one and switches to it in one rename; failed, refused and killed rebuilds leave the old index;
readers keep answering during a rebuild; SQLite is the truth for generation and counts; a
format-1 folder still opens and updates; `--index-type` re-indexes stored vectors; a fused index
needs captions; an index finds its model when both moved together."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import BAD_IMAGES, GOOD_IMAGES, random_image
from mmretrieve.bundle import resolve_model_ref, save_bundle
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images, index_texts, remove_files
from mmretrieve.index.search import IndexReader
from mmretrieve.index.store import FORMAT_VERSION, IndexStore, read_manifest
from mmretrieve.runtime.torch_runtime import TorchEmbedder

pytestmark = pytest.mark.slow


def build(root, index_dir, embedder, **options):
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return index_images(root, index_dir, embedder, **options)


def state(index_dir, embedder):
    """What a reader sees: (generation, sorted file names)."""
    reader = IndexReader(index_dir, embedder=embedder)
    try:
        ids, _ = reader.store.all_embeddings()
        return reader.generation, sorted(os.path.basename(i.path) for i in reader.store.items_by_id(ids).values())
    finally:
        reader.close()


def data_folders(index_dir):
    return sorted(p.name for p in index_dir.glob("data-*"))


@pytest.fixture
def holiday_index(messy_image_folder, tmp_path, embedder):
    """An index of the 3 images under holiday/, built with two runs (generation 2)."""
    index_dir = tmp_path / "idx"
    build(messy_image_folder / "holiday", index_dir, embedder, include=("*.png",))
    build(messy_image_folder / "holiday", index_dir, embedder)
    return index_dir


def test_a_new_index_keeps_its_data_in_the_folder_its_manifest_names(holiday_index, embedder):
    manifest = read_manifest(holiday_index)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["store"] == "data-000001"
    assert data_folders(holiday_index) == ["data-000001"] and not (holiday_index / "items.sqlite").exists()
    with IndexStore.open(holiday_index, readonly=True) as store:
        assert store.data_folder == holiday_index / "data-000001"
        assert store.vectors_folder().parent == store.data_folder / "vectors"
        assert store.counts() == {"items": 3, "failures": 0, "generation": 2}


def refuse_to_create(monkeypatch):
    """Fail the test if a data folder is made: what can be refused must be refused before."""
    def create(*args, **kwargs):
        raise AssertionError("a data folder was created before the run was refused")

    monkeypatch.setattr(IndexStore, "create", create)


@pytest.mark.parametrize("source", ["missing", "empty"])
def test_a_refused_rebuild_leaves_the_index_as_it_was(holiday_index, messy_image_folder, tmp_path, embedder, source,
                                                      monkeypatch):
    before, manifest = state(holiday_index, embedder), (holiday_index / "manifest.json").read_text()
    folder = tmp_path / source
    if source == "empty":
        folder.mkdir()
    refuse_to_create(monkeypatch)
    with pytest.raises(InputError, match="no such file or folder" if source == "missing" else "no image files"):
        build(folder, holiday_index, embedder, rebuild=True)
    assert state(holiday_index, embedder) == before == (2, ["b.png", "café ☕.webp", "tall.bmp"])
    assert (holiday_index / "manifest.json").read_text() == manifest
    assert data_folders(holiday_index) == ["data-000001"]  # nothing left behind


def test_a_rebuild_that_fails_halfway_leaves_the_old_index_and_is_resumed(holiday_index, messy_image_folder,
                                                                          embedder, monkeypatch):
    before = state(holiday_index, embedder)
    original = embedder.embed_pixels
    calls = {"n": 0}

    def fails_on_third_batch(pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the GPU fell off the bus")
        return original(pixels)

    monkeypatch.setattr(embedder, "embed_pixels", fails_on_third_batch)
    with pytest.raises(RuntimeError):
        build(messy_image_folder, holiday_index, embedder, rebuild=True, batch_size=1)
    assert state(holiday_index, embedder) == before
    assert read_manifest(holiday_index)["store"] == "data-000001"
    assert data_folders(holiday_index) == ["data-000001", "data-000002"]  # the half-built one, kept to resume

    embedded = []
    monkeypatch.setattr(embedder, "embed_pixels", lambda p: embedded.append(len(p)) or original(p))
    report = build(messy_image_folder, holiday_index, embedder, rebuild=True, batch_size=1)
    assert sum(embedded) == len(GOOD_IMAGES) - 2  # the two staged before the failure were kept
    assert report.total == len(GOOD_IMAGES) and report.generation == before[0] + 1  # generations only grow
    assert state(holiday_index, embedder) == (before[0] + 1, sorted(GOOD_IMAGES))
    assert data_folders(holiday_index) == ["data-000002"]  # the replaced data folder is gone


def test_an_ordinary_run_after_a_killed_rebuild_removes_its_data_folder(holiday_index, messy_image_folder, embedder,
                                                                       monkeypatch):
    def interrupted(pixels):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(embedder, "embed_pixels", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(messy_image_folder, holiday_index, embedder, rebuild=True)
    assert len(data_folders(holiday_index)) == 2
    (holiday_index / "data-000007").mkdir()
    (holiday_index / "data-000007" / "mine.txt").write_text("a folder of the user's, named like ours")
    report = build(messy_image_folder / "holiday", holiday_index, embedder)
    assert (report.added, report.unchanged) == (0, 3)
    assert data_folders(holiday_index) == ["data-000001", "data-000007"]  # only what an index wrote is removed


def test_readers_see_the_old_index_until_the_rebuild_is_complete(holiday_index, messy_image_folder, embedder,
                                                                 bundle, monkeypatch):
    other = TorchEmbedder(str(bundle), device="cpu")  # the readers' own, so the writer's can be patched
    early = IndexReader(holiday_index, embedder=other)  # opened before the rebuild, kept open through it
    query = other.embed_images([messy_image_folder / "a.jpg"])
    old = state(holiday_index, other)
    seen_during = []
    original = IndexStore.stage

    def stages_and_looks(store, items, vectors):
        # In the middle of the rebuild (after a publish inside its new data folder): search.
        reader = IndexReader(holiday_index, embedder=other)
        seen_during.append((state(holiday_index, other), len(reader.search_vectors(query, k=10)[0])))
        reader.close()
        assert not early.refresh()  # nothing new has been published for readers
        return original(store, items, vectors)

    monkeypatch.setattr(IndexStore, "stage", stages_and_looks)
    build(messy_image_folder, holiday_index, embedder, rebuild=True, batch_size=1, commit_every=2)
    assert len(seen_during) == len(GOOD_IMAGES)
    assert all(seen == (old, 3) for seen in seen_during)
    # The early reader still answers from the old data folder (deleted now; its files stay open) ...
    assert len(early.search_vectors(query, k=10)[0]) == 3
    # ... and refresh() moves it to the new one.
    assert early.refresh() and early.store.data_folder.name == "data-000002"
    hits = early.search_vectors(query, k=10)[0]
    assert len(hits) == len(GOOD_IMAGES) and os.path.basename(hits[0].path) == "a.jpg"
    early.close()


def test_a_format_1_index_opens_updates_in_place_and_rebuilds_into_a_data_folder(holiday_index, messy_image_folder,
                                                                                 embedder):
    # An index as mmretrieve wrote it before data folders: data in the index folder, no "store".
    data = holiday_index / "data-000001"
    for entry in data.iterdir():
        shutil.move(str(entry), holiday_index / entry.name)
    data.rmdir()
    manifest = read_manifest(holiday_index)
    del manifest["store"]
    manifest["format_version"] = 1
    (holiday_index / "manifest.json").write_text(json.dumps(manifest))
    assert state(holiday_index, embedder) == (2, ["b.png", "café ☕.webp", "tall.bmp"])

    random_image(40).save(messy_image_folder / "holiday" / "new.png")
    report = build(messy_image_folder / "holiday", holiday_index, embedder)
    assert (report.added, report.generation) == (1, 3)
    assert data_folders(holiday_index) == [] and (holiday_index / "items.sqlite").is_file()
    # Its database moved to the current layout in place (format 3); the data stay where they were.
    manifest = read_manifest(holiday_index)
    assert manifest["format_version"] == FORMAT_VERSION and "store" not in manifest
    assert state(holiday_index, embedder)[1] == ["b.png", "café ☕.webp", "new.png", "tall.bmp"]

    report = build(messy_image_folder / "holiday", holiday_index, embedder, rebuild=True)
    assert report.total == 4 and read_manifest(holiday_index)["store"] == "data-000001"
    assert not (holiday_index / "items.sqlite").exists() and not (holiday_index / "vectors").exists()
    assert not list(holiday_index.glob("embeddings-*.f32"))
    assert state(holiday_index, embedder) == (4, ["b.png", "café ☕.webp", "new.png", "tall.bmp"])


def test_a_stale_manifest_is_repaired_and_never_believed(holiday_index, messy_image_folder, embedder):
    stale = (holiday_index / "manifest.json").read_text()
    (messy_image_folder / "holiday" / "tall.bmp").unlink()
    build(messy_image_folder / "holiday", holiday_index, embedder)
    # As if killed between the SQLite commit (generation 3, 2 items) and the manifest rewrite.
    (holiday_index / "manifest.json").write_text(stale)
    assert json.loads(stale)["generation"] == 2 and json.loads(stale)["counts"]["items"] == 3
    reader = IndexReader(holiday_index, embedder=embedder)
    assert (reader.generation, len(reader.index), reader.manifest["generation"]) == (3, 2, 3)
    with IndexStore.open(holiday_index, readonly=True) as store:
        assert store.counts() == {"items": 2, "failures": 0, "generation": 3}
    report = build(messy_image_folder / "holiday", holiday_index, embedder)  # a run with nothing to do
    assert (report.added, report.removed, report.generation) == (0, 0, 3)
    repaired = read_manifest(holiday_index)
    assert (repaired["generation"], repaired["counts"]) == (3, {"items": 2, "failures": 0})


def test_another_index_type_reindexes_the_stored_vectors(holiday_index, messy_image_folder, embedder, monkeypatch):
    def must_not_embed(pixels):
        raise AssertionError("nothing may be embedded to change the index type")

    monkeypatch.setattr(embedder, "embed_pixels", must_not_embed)
    same = build(messy_image_folder / "holiday", holiday_index, embedder, index_type="flat")  # auto chose flat
    assert (same.index_type, same.generation) == ("flat", 2) and "already is flat" in same.notes[0]
    assert read_manifest(holiday_index)["requested_index_type"] == "flat"
    report = build(messy_image_folder / "holiday", holiday_index, embedder, index_type="hnsw")
    assert (report.index_type, report.generation, report.added) == ("hnsw", 3, 0)
    assert report.notes and "hnsw" in report.notes[0] and "without embedding" in report.notes[0]
    reader = IndexReader(holiday_index, embedder=embedder)
    assert reader.index.kind == "hnsw" and len(reader.index) == 3
    manifest = read_manifest(holiday_index)
    assert (manifest["requested_index_type"], manifest["index_type"]) == ("hnsw", "hnsw")
    # A later run without --index-type keeps it; the same type again changes nothing.
    for index_type in (None, "hnsw"):
        again = build(messy_image_folder / "holiday", holiday_index, embedder, index_type=index_type)
        assert (again.index_type, again.generation, again.notes) == ("hnsw", 3, [])


def test_failure_counts_come_from_sqlite_after_every_run(holiday_index, messy_image_folder, embedder):
    (messy_image_folder / "holiday" / "broken.jpg").write_bytes(b"not a jpeg")
    report = build(messy_image_folder / "holiday", holiday_index, embedder)
    assert len(report.failed) == 1 and report.generation == 2  # nothing to publish
    with IndexStore.open(holiday_index, readonly=True) as store:
        assert store.counts() == {"items": 3, "failures": 1, "generation": 2}
    assert read_manifest(holiday_index)["counts"] == {"items": 3, "failures": 1}
    (messy_image_folder / "holiday" / "broken.jpg").unlink()
    build(messy_image_folder / "holiday", holiday_index, embedder)
    with IndexStore.open(holiday_index, readonly=True) as store:
        assert store.counts()["failures"] == 0  # a failed file that is gone is no failure any more
    assert read_manifest(holiday_index)["counts"] == {"items": 3, "failures": 0}


def test_a_fused_index_needs_captions_for_its_images(messy_image_folder, tmp_path, embedder, caplog, monkeypatch):
    from mmretrieve.fusion.resolve import resolve_fusion

    fusion = resolve_fusion(embedder, "mean", None)
    elsewhere = {str(tmp_path / "other" / "x.jpg"): ["a dog"]}
    found = len(GOOD_IMAGES) + len(BAD_IMAGES)
    with monkeypatch.context() as patch:
        refuse_to_create(patch)
        with pytest.raises(InputError, match=f"none of the {found} images .* has a caption"):
            build(messy_image_folder, tmp_path / "fused", embedder, captions=elsewhere, fusion=fusion)
    assert not (tmp_path / "fused" / "manifest.json").exists() and data_folders(tmp_path / "fused") == []

    one = {str((messy_image_folder / "a.jpg").resolve()): ["a photo"]}
    with caplog.at_level("WARNING", logger="mmretrieve.index.builder"):
        report = build(messy_image_folder, tmp_path / "fused", embedder, captions=one, fusion=fusion)
    assert report.total == len(GOOD_IMAGES) and report.uncaptioned == 3
    assert f"{found - 1} of the {found} images" in caplog.text and "no caption" in caplog.text


def test_an_index_finds_its_model_moved_together_with_it(messy_image_folder, tmp_path, tiny_model, monkeypatch):
    project = tmp_path / "project"
    model_dir = save_bundle(tiny_model, project / "runs" / "best").path
    monkeypatch.chdir(project)
    report = build(messy_image_folder, "idx", TorchEmbedder("runs/best", device="cpu"))
    assert report.total == len(GOOD_IMAGES)
    recorded = read_manifest(project / "idx")["model"]
    assert recorded["path"] == str(model_dir.resolve()) and recorded["relative_path"] == "../runs/best"

    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "moved")
    moved = tmp_path / "moved" / "idx"
    moved_model = str((tmp_path / "moved" / "runs" / "best").resolve())
    assert resolve_model_ref(built_with=recorded, index_dir=moved) == moved_model
    reader = IndexReader(moved)  # loads the model from where it is now
    assert len(reader.search_text(["a photo"], k=2)[0]) == 2
    shutil.rmtree(tmp_path / "moved" / "runs")
    with pytest.raises(InputError, match=r"has no folder at .*project/runs/best or .*moved/runs/best; give --model"):
        resolve_model_ref(built_with=recorded, index_dir=moved)


def test_a_caption_index_rebuilds_beside_the_old_one(tmp_path, embedder):
    from tiny_models import make_colour_dataset

    data = make_colour_dataset(tmp_path / "colours", per_colour=1)
    first = index_texts(data, tmp_path / "texts", embedder, progress=False)
    with pytest.raises(InputError):
        index_texts(tmp_path / "missing.jsonl", tmp_path / "texts", embedder, progress=False, rebuild=True)
    again = index_texts(data, tmp_path / "texts", embedder, progress=False, rebuild=True)
    assert again.total == first.total and again.generation == first.generation + 1
    assert data_folders(tmp_path / "texts") == ["data-000002"]


def test_remove_files_repairs_the_manifest_too(holiday_index, messy_image_folder, embedder):
    assert remove_files(holiday_index, [messy_image_folder / "holiday" / "b.png"]) == 1
    assert read_manifest(holiday_index)["counts"] == {"items": 2, "failures": 0}
    assert state(holiday_index, embedder) == (3, ["café ☕.webp", "tall.bmp"])
