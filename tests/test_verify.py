"""`info INDEX --verify` and damaged indexes: every kind of damage fails verification naming the
problem, and every command that opens the index says in one sentence how to rebuild it."""

from __future__ import annotations

import functools
import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_image
from fakes import ColourEmbedder
from mmretrieve.cli import cli
from mmretrieve.errors import IndexDamagedError, InputError
from mmretrieve.index.builder import index_images
from mmretrieve.index.search import IndexReader
from mmretrieve.index.store import IndexStore, split_path
from mmretrieve.index.verify import verify_index


FakeEmbedder = functools.partial(ColourEmbedder, "fake-verify-model", 12)


def build(root, index_dir, **options):
    return index_images(root, index_dir, FakeEmbedder(), workers=0, progress=False, **options)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(12):
        random_image(n, size=(16, 12)).save(folder / f"img{n:02d}.png")
    return folder


@pytest.fixture
def index_dir(photos, tmp_path):
    build(photos, tmp_path / "idx")
    return tmp_path / "idx"


def data_folder(index_dir):
    with IndexStore.open(index_dir, readonly=True) as store:
        return store.data_folder, store.vectors_folder()


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError, KeyError))
    return result


def failed(report) -> dict[str, str]:
    return {check.name: check.detail for check in report.problems}


# -- a healthy index -------------------------------------------------------------------------
def test_a_healthy_index_verifies_and_records_its_files_hashes(index_dir):
    _, vectors = data_folder(index_dir)
    meta = json.loads((vectors / "index.json").read_text())
    assert set(meta["files"]) == {"flat.faiss"}
    assert meta["files"]["flat.faiss"]["size"] == (vectors / "flat.faiss").stat().st_size
    assert len(meta["files"]["flat.faiss"]["sha256"]) == 64

    report = verify_index(index_dir)
    assert report.ok and not report.problems
    assert [c.name for c in report.checks] == ["manifest", "database", "embeddings", "vectors", "files", "faiss",
                                               "count", "ids", "vector file"]
    assert "intact" in report.verdict

    result = run("info", index_dir, "--verify")
    assert result.exit_code == 0, result.output
    assert "ids:          ok (FAISS and SQLite hold the same 12 ids)" in result.output
    assert "files:        ok (1 file matches its recorded size and SHA-256: flat.faiss)" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("verified:")
    data = json.loads(run("info", index_dir, "--verify", "--json").output)
    assert data["verify"]["ok"] is True and data["counts"]["items"] == 12


def test_an_hnsw_index_verifies_with_its_row_table(photos, tmp_path):
    build(photos, tmp_path / "idx", index_type="hnsw")
    report = verify_index(tmp_path / "idx")
    assert report.ok, report.lines()
    detail = {c.name: c.detail for c in report.checks}
    assert detail["files"] == "2 files match their recorded sizes and SHA-256: hnsw.faiss, row_ids.npy"
    assert detail["ids"] == "FAISS and SQLite hold the same 12 ids"


def test_an_ivfpq_index_checks_its_reranking_vector_file(photos, tmp_path):
    build(photos, tmp_path / "idx", index_type="ivfpq")
    report = verify_index(tmp_path / "idx")
    assert report.ok, report.lines()
    detail = {c.name: c.detail for c in report.checks}
    assert "vectors.f32 is 12 x 12; 12 sampled rows equal the stored embeddings" in detail["vector file"]
    assert "row_ids.npy" in detail["files"] and "vectors.f32" in detail["files"]

    # Other vectors of the right size: the hash and the comparison with SQLite both notice.
    _, vectors = data_folder(tmp_path / "idx")
    matrix = np.fromfile(vectors / "vectors.f32", dtype=np.float32)
    matrix[::-1].tofile(vectors / "vectors.f32")
    problems = failed(verify_index(tmp_path / "idx"))
    assert "vectors.f32 does not match its recorded SHA-256" in problems["files"]
    assert "sampled rows of vectors.f32 differ from the stored embeddings" in problems["vector file"]


def test_a_folder_saved_without_hashes_still_loads_and_verifies(index_dir):
    _, vectors = data_folder(index_dir)
    meta = json.loads((vectors / "index.json").read_text())
    del meta["files"]
    (vectors / "index.json").write_text(json.dumps(meta))
    report = verify_index(index_dir)
    assert report.ok
    assert "no recorded hashes" in {c.name: c.detail for c in report.checks}["files"]
    assert len(IndexReader(index_dir, embedder=FakeEmbedder()).index) == 12


# -- damage ----------------------------------------------------------------------------------
def overwrite_faiss(index_dir):
    _, vectors = data_folder(index_dir)
    path = vectors / "flat.faiss"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def delete_vectors(index_dir):
    import shutil

    data, _ = data_folder(index_dir)
    shutil.rmtree(data / "vectors")


def truncate_sqlite(index_dir):
    data, _ = data_folder(index_dir)
    path = data / "items.sqlite"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def garbage_sqlite(index_dir):
    data, _ = data_folder(index_dir)
    (data / "items.sqlite").write_bytes(np.random.default_rng(1).bytes(40_000))


def delete_index_json(index_dir):
    _, vectors = data_folder(index_dir)
    (vectors / "index.json").unlink()


DAMAGE = {  # kind -> (how, the check that fails, words it says, words `search` says)
    "faiss overwritten": (overwrite_faiss, "files", "flat.faiss does not match its recorded SHA-256",
                          "not recognized"),
    "vectors deleted": (delete_vectors, "vectors", "the published generation's folder, is missing",
                        "the published generation's vectors"),
    "sqlite truncated": (truncate_sqlite, "database", "database disk image is malformed",
                         "database disk image is malformed"),
    "sqlite garbage": (garbage_sqlite, "database", "file is not a database", "file is not a database"),
    "index.json deleted": (delete_index_json, "files", "index.json is missing", "index.json is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_fails_verify_and_every_command_says_rebuild(kind, index_dir, photos):
    damage, check, says, search_says = DAMAGE[kind]
    damage(index_dir)
    rebuild = (f"rebuild it with `mmretrieve index {photos} --index-dir {index_dir} --model fake-verify-model "
               f"--rebuild`")

    report = verify_index(index_dir)
    assert not report.ok
    assert says in failed(report)[check]
    assert report.verdict.startswith(f"the index {index_dir} is damaged: ") and report.verdict.endswith(rebuild)

    result = run("info", index_dir, "--verify")
    assert result.exit_code == 1
    assert f"{check + ':':<13} FAILED" in result.output
    assert result.output.rstrip().splitlines()[-1] == f"Error: {report.verdict}"

    data = json.loads(run("info", index_dir, "--verify", "--json").output)
    assert data["verify"]["ok"] is False and data["verify"]["verdict"] == report.verdict

    result = run("search", "a dog", "--index-dir", index_dir)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and search_says in lines[0] and lines[0].endswith(rebuild)

    with pytest.raises(IndexDamagedError, match="--rebuild"):
        IndexReader(index_dir, embedder=FakeEmbedder())

    result = run("info", index_dir)
    if kind == "faiss overwritten":  # same size, so only --verify (which hashes) can tell
        assert result.exit_code == 0
    else:
        assert result.exit_code == 1 and result.output.strip().splitlines() == [f"Error: {lines[0][7:]}"]


@pytest.mark.parametrize("kind", ["sqlite garbage", "faiss overwritten", "vectors deleted"])
def test_rebuilding_a_damaged_index_makes_it_whole(kind, index_dir, photos):
    DAMAGE[kind][0](index_dir)
    report = build(photos, index_dir, rebuild=True)
    assert report.total == 12
    assert verify_index(index_dir).ok
    assert len(IndexReader(index_dir, embedder=FakeEmbedder()).index) == 12


def test_an_index_run_with_work_to_publish_remakes_damaged_vectors_from_sqlite(index_dir, photos, caplog):
    overwrite_faiss(index_dir)
    random_image(99, size=(16, 12)).save(photos / "new.png")
    report = build(photos, index_dir)  # nothing is embedded again but the new file
    assert (report.added, report.total) == (1, 13)
    assert "building the vectors again from the embeddings stored in the index" in caplog.text
    assert verify_index(index_dir).ok


def test_faiss_ids_and_sqlite_ids_must_agree(index_dir):
    data, _ = data_folder(index_dir)
    with sqlite3.connect(data / "items.sqlite") as db:
        db.execute("DELETE FROM items WHERE id = (SELECT MIN(id) FROM items)")
        db.execute("UPDATE items SET id = 1000 WHERE id = (SELECT MAX(id) FROM items)")
    db.close()
    problems = failed(verify_index(index_dir))
    assert problems["count"] == "FAISS 12 vectors, SQLite 11 items"
    assert "2 FAISS ids have no SQLite item" in problems["ids"] and "1 SQLite items have no FAISS vector (e.g. 1000)" \
        in problems["ids"]


def test_a_stored_embeddings_file_cut_short_is_found(index_dir):
    data, _ = data_folder(index_dir)
    embeddings = next(data.glob("embeddings-*.f32"))
    with open(embeddings, "r+b") as file:
        file.truncate(embeddings.stat().st_size - 40)
    assert f"1 items name rows past the end of {embeddings.name}, which holds 11" in \
        failed(verify_index(index_dir))["embeddings"]


# -- item 14: info counts what SQLite holds ---------------------------------------------------
def test_info_counts_items_and_failures_in_sqlite_not_the_manifest_cache(index_dir, photos):
    (photos / "broken.jpg").write_bytes(b"not an image")
    build(photos, index_dir)
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"] = {"items": 999, "failures": 0}  # a stale cache (e.g. a kill before its rewrite)
    manifest_path.write_text(json.dumps(manifest))
    result = run("info", index_dir)
    assert result.exit_code == 0, result.output
    assert "holds:        12 image items, 1 files that failed to read; generation 1" in result.output
    assert json.loads(run("info", index_dir, "--json").output)["counts"] == {"items": 12, "failures": 1,
                                                                             "generation": 1}


# -- review of issue 13: --rebuild recovers any damaged manifest; every reader names damage -----
def break_manifest(index_dir, how):
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if how == "not json":
        path.write_text("{ not json")
    elif how == "a list":
        path.write_text("[1, 2]")
    elif how == "bad store":
        path.write_text(json.dumps({**manifest, "store": "data-x"}))
    elif how == "no modality":
        path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "modality"}))


@pytest.mark.parametrize("how", ["not json", "a list", "bad store", "no modality"])
def test_rebuild_recovers_a_damaged_manifest(how, index_dir, photos):
    break_manifest(index_dir, how)
    report = build(photos, index_dir, rebuild=True)
    assert report.added == 12 and report.total == 12
    assert verify_index(index_dir).ok
    assert len(IndexReader(index_dir, embedder=FakeEmbedder()).index) == 12


def use_fake_model(monkeypatch, used):
    import mmretrieve.runtime

    def load_embedder(ref, *args, **kwargs):
        used.append(ref)
        return FakeEmbedder()

    monkeypatch.setattr(mmretrieve.runtime, "load_embedder", load_embedder)
    monkeypatch.setattr("mmretrieve.cli.default_model_name", lambda folder: "default")


@pytest.mark.parametrize("how", ["not json", "a list", "no modality"])
def test_the_index_command_rebuilds_a_damaged_manifest_as_its_error_says(how, index_dir, photos, monkeypatch):
    used = []
    use_fake_model(monkeypatch, used)
    break_manifest(index_dir, how)
    result = run("index", photos, "--index-dir", index_dir, "--rebuild", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "12 items" in result.output and used == ["default"]
    assert verify_index(index_dir).ok


def test_the_rebuild_command_names_a_model_other_than_the_default(index_dir, photos):
    from mmretrieve.index.damage import rebuild_command

    assert rebuild_command(index_dir) == (f"mmretrieve index {photos} --index-dir {index_dir} "
                                          f"--model fake-verify-model --rebuild")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["model"]["ref"] = "default"
    assert rebuild_command(index_dir, manifest).endswith("--rebuild")


def empty_sqlite(index_dir):
    data, _ = data_folder(index_dir)
    (data / "items.sqlite").write_bytes(b"")


def test_an_empty_database_file_is_damage_for_every_reader(index_dir, photos):
    empty_sqlite(index_dir)
    with pytest.raises(IndexDamagedError, match="--rebuild"):
        IndexReader(index_dir, embedder=FakeEmbedder())
    with pytest.raises(IndexDamagedError, match="--rebuild"):
        IndexStore.open(index_dir, readonly=True)
    result = run("info", index_dir)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "is damaged" in result.output and "--rebuild" in result.output
    result = run("search", "a dog", "--index-dir", index_dir)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "is damaged" in result.output
    report = verify_index(index_dir)
    assert not report.ok and "database" in failed(report)
    assert build(photos, index_dir, rebuild=True).total == 12


def test_verify_reports_a_non_json_manifest_as_a_failed_check(index_dir):
    break_manifest(index_dir, "not json")
    result = run("info", index_dir, "--verify", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["verify"]["ok"] is False and "manifest" in {c["name"] for c in data["verify"]["checks"]
                                                            if not c["ok"]}
    result = run("info", index_dir, "--verify")
    assert result.exit_code == 1 and f"{'manifest:':<13} FAILED" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith(f"Error: the index {index_dir} is damaged")


def test_a_rebuild_keeps_the_requested_index_type(photos, tmp_path):
    build(photos, tmp_path / "idx", index_type="hnsw")
    build(photos, tmp_path / "idx", rebuild=True)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["requested_index_type"] == "hnsw" and manifest["index_type"] == "hnsw"
    build(photos, tmp_path / "idx", rebuild=True, index_type="flat")
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["requested_index_type"] == "flat"


def test_an_empty_folder_leaves_no_new_index_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        build(tmp_path / "empty", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("when", ["before the manifest", "after the manifest"])
def test_a_rebuild_killed_while_it_switches_is_not_resumed_into_the_live_folder(when, index_dir, photos,
                                                                                monkeypatch):
    import mmretrieve.index.store as store_module

    real = store_module.write_text_atomic

    def write(path, *args, **kwargs):
        if path.name == "manifest.json" and when == "before the manifest":
            raise SystemExit(137)
        real(path, *args, **kwargs)
        if path.name == "manifest.json":
            raise SystemExit(137)

    monkeypatch.setattr(store_module, "write_text_atomic", write)
    with pytest.raises(SystemExit):
        build(photos, index_dir, rebuild=True)
    monkeypatch.setattr(store_module, "write_text_atomic", real)
    live = json.loads((index_dir / "manifest.json").read_text())["store"]
    report = build(photos, index_dir, rebuild=True)
    if when == "after the manifest":  # the switch happened: the next rebuild starts a new folder, re-embeds all
        assert report.added == 12 and report.unchanged == 0
        assert json.loads((index_dir / "manifest.json").read_text())["store"] != live
    assert report.total == 12 and verify_index(index_dir).ok
    assert not list(index_dir.glob("data-*/pending.json"))


# -- indexes from before `roots` and link paths were recorded ---------------------------------
def make_old(index_dir, rename=None):
    """Make ``index_dir`` look written by an older mmretrieve: no "roots" in its manifest, and
    items recorded under other paths (``rename``: {path now: path the old code recorded})."""
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("roots", None)
    path.write_text(json.dumps(manifest))
    data, _ = data_folder(index_dir)
    with sqlite3.connect(data / "items.sqlite") as db:
        for now, old in (rename or {}).items():  # paths are a folder (interned) and a file name
            folder, name = split_path(old)
            db.execute("INSERT OR IGNORE INTO folders (path) VALUES (?)", (folder,))
            db.execute("UPDATE items SET folder = (SELECT id FROM folders WHERE path = ?), name = ? "
                       "WHERE folder = (SELECT id FROM folders WHERE path = ?) AND name = ?",
                       (folder, name, *split_path(now)))
    db.close()


def test_the_first_run_that_records_roots_keeps_the_folder_older_runs_indexed(index_dir, photos):
    make_old(index_dir)
    (photos / "new").mkdir()
    random_image(50, size=(16, 12)).save(photos / "new" / "late.png")
    build(photos / "new", index_dir)
    roots = json.loads((index_dir / "manifest.json").read_text())["roots"]
    assert roots == [str(photos.resolve()), str((photos / "new").resolve())]


def test_seeded_roots_are_the_common_folder_never_the_whole_filesystem():
    from mmretrieve.index.builder import _item_folders

    assert _item_folders(["/p/a/x.png", "/p/b/y.png"]) == ["/p"]
    assert _item_folders(["/p/a/x.png"]) == ["/p/a"]
    assert _item_folders(["/a/x.png", "/b/c/y.png", "/a/sub/z.png", "/b/c/d/w.png"]) == ["/a", "/b/c"]
    assert _item_folders([]) == []


@pytest.mark.parametrize("follow", [False, True])
def test_a_link_an_older_version_recorded_by_its_target_vanishes_with_the_link(follow, photos, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    random_image(60, size=(16, 12)).save(outside / "far.png")
    (photos / "far.png").symlink_to(outside / "far.png")
    build(photos, tmp_path / "idx", follow_links=True)
    # the old code recorded the link's target, outside the folder
    make_old(tmp_path / "idx", {str(photos.resolve() / "far.png"): str((outside / "far.png").resolve())})

    report = build(photos, tmp_path / "idx", follow_links=follow)
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        paths = set(store.known_files())
    assert str((outside / "far.png").resolve()) not in paths and report.removed == 1
    assert (str(photos.resolve() / "far.png") in paths) == follow and report.added == int(follow)
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["roots"] == [str(photos.resolve())]
    (photos / "far.png").unlink()
    report = build(photos, tmp_path / "idx", follow_links=follow)
    assert report.removed == int(follow) and report.total == 12


def test_a_link_into_another_indexed_folder_keeps_that_folders_items(photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    random_image(70, size=(16, 12)).save(other / "mine.png")
    build(other, tmp_path / "idx")
    (photos / "mine.png").symlink_to(other / "mine.png")
    report = build(photos, tmp_path / "idx")
    assert report.removed == 0 and report.total == 13
