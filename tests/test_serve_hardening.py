"""The service under careless or hostile use (issue 13): which files it sends by default, reloads
that never leave an index missing, fusion weights that overflow, bounded k, /health without
paths, and `serve --json` for scripts."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image

pytest.importorskip("fastapi")

from test_serve import bundle, index_folder, search, small_app, small_index, upload  # noqa: E402,F401 (fixtures)

from mmretrieve.fusion.weights import parse_weights  # noqa: E402
from mmretrieve.index import search as index_search  # noqa: E402
from mmretrieve.index.store import MANIFEST, read_manifest  # noqa: E402

pytestmark = pytest.mark.slow


def set_manifest(index_dir: Path, **changes) -> None:
    """Edit an index's manifest the way a run would (a new file in its place)."""
    manifest = read_manifest(index_dir)
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    fresh = index_dir / (MANIFEST + ".new")
    fresh.write_text(json.dumps(manifest))
    os.replace(fresh, index_dir / MANIFEST)


def database_of(index_dir: Path) -> Path:
    """The SQLite file a reader of the index opens, wherever the index layout keeps it."""
    from mmretrieve.serve.engine import _database_file

    reader = index_search.IndexReader(index_dir)
    try:
        return _database_file(reader)
    finally:
        reader.close()


# -- which files are sent (item 4) ----------------------------------------------------------

def test_by_default_only_files_under_the_indexed_folders_are_sent(small_index):
    photos, outside, index_dir = small_index["photos"], small_index["outside"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    index_folder(outside, index_dir)
    # An item outside the indexed folders: what a followed symlink's target (indexed under its
    # real path) is, or what an index made by an older version holds after such a link went.
    set_manifest(index_dir, roots=[str(photos)])
    with small_app(small_index) as client:  # no --root
        hits = {Path(h["path"]).name: h for h in search(client, k=10)["results"]}
        assert set(hits) == {"p0.png", "p1.png", "p2.png", "secret.png"}
        for url in (hits["secret.png"]["file_url"], hits["secret.png"]["thumbnail_url"]):
            refused = client.get(url)
            assert refused.status_code == 403 and "outside the folders" in refused.json()["error"]
        assert client.get(hits["p0.png"]["file_url"]).status_code == 200
        # A later run that indexes the other folder too widens what is sent, without a restart.
        set_manifest(index_dir, roots=[str(photos), str(outside)])
        search(client)  # a batch: the engine looks at the folder and tells the catalog
        assert client.get(hits["secret.png"]["file_url"]).status_code == 200


def test_an_index_without_recorded_folders_is_never_served_from_the_filesystem_root(small_index):
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    set_manifest(index_dir, roots=None)  # made before roots were recorded
    with small_app(small_index) as client:
        hits = {Path(h["path"]).name: h for h in search(client, k=10)["results"]}
        assert client.get(hits["p0.png"]["file_url"]).status_code == 200  # the items' common folder
    # One item elsewhere on the disk would make that common folder `/`: then nothing is sent.
    with sqlite3.connect(database_of(index_dir)) as db:
        db.execute("INSERT INTO folders (path) VALUES ('/mmretrieve-elsewhere/')")  # paths: folder + file name
        db.execute("UPDATE items SET folder = (SELECT id FROM folders WHERE path = '/mmretrieve-elsewhere/'), "
                   "name = 'x.png' WHERE name = 'p2.png'")
    with small_app(small_index) as client:
        refused = client.get(hits["p0.png"]["file_url"])
        assert refused.status_code == 403 and "--root" in refused.json()["error"]
    with small_app(small_index, roots=(photos,)) as client:  # --root says where
        assert client.get(hits["p0.png"]["file_url"]).status_code == 200


# -- reloads (item 10) ------------------------------------------------------------------------

def test_searches_during_rebuilds_all_succeed(small_index):
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        codes, stop = [], threading.Event()

        def keep_searching():
            while not stop.is_set():
                codes.append(client.get("/api/search", params={"q": "a dog", "k": 3}).status_code)

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            for round_ in range(3):
                random_image(50 + round_).save(photos / f"r{round_}.png")
                index_folder(photos, index_dir, "--rebuild")
                after = search(client, k=10)["results"]  # this batch loads the rebuilt index
                assert f"r{round_}.png" in {Path(h["path"]).name for h in after}
        finally:
            stop.set()
            searcher.join()
    assert codes and set(codes) == {200}, {code: codes.count(code) for code in set(codes)}


def test_a_replaced_database_is_swapped_in_before_the_old_reader_closes(small_index, monkeypatch):
    """A database file replaced in place (what `index --rebuild` did before data folders) is
    opened as a new reader, which takes the old one's place before the old one is closed: a
    request arriving while it closes (the moment observed here) finds the index."""
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    database = database_of(index_dir)
    observed, close = [], index_search.IndexReader.close

    def observed_close(reader):
        if serving.is_set():  # not the closes at shutdown
            observed.append("images" in app.state.engine.readers)
        close(reader)

    monkeypatch.setattr(index_search.IndexReader, "close", observed_close)
    serving = threading.Event()
    with small_app(small_index) as client:
        app = client.app
        serving.set()
        for _ in range(2):
            copy = database.with_name("copy.sqlite")
            copy.write_bytes(database.read_bytes())
            os.replace(copy, database)  # the same rows in a new file
            assert len(search(client, k=10)["results"]) == 3
            assert client.get(search(client)["results"][0]["file_url"]).status_code == 200  # the catalog followed
        serving.clear()
    assert observed == [True, True]


def test_a_failed_reload_keeps_the_old_index_serving_and_says_why_once(small_index, monkeypatch, caplog):
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        before = {Path(h["path"]).name for h in search(client, k=10)["results"]}
        random_image(60).save(photos / "new.png")
        index_folder(photos, index_dir, "--rebuild")

        def broken(*args, **kwargs):
            raise OSError("disk on fire")

        monkeypatch.setattr(index_search, "IndexReader", broken)
        monkeypatch.setattr(index_search, "IndexStore", broken)  # a rebuild is loaded by refresh(), into a new store
        with caplog.at_level(logging.WARNING, logger="mmretrieve.serve.engine"):
            for _ in range(3):
                assert {Path(h["path"]).name for h in search(client, k=10)["results"]} == before
        warnings = [r.getMessage() for r in caplog.records if "disk on fire" in r.getMessage()]
        assert len(warnings) == 1 and "still serving generation" in warnings[0]
        monkeypatch.undo()
        assert "new.png" in {Path(h["path"]).name for h in search(client, k=10)["results"]}


def test_an_unchanged_index_is_not_read_again_on_every_query(small_index, monkeypatch):
    """Between publishes a check is a few stats; a new generation, or only a rewritten manifest
    (an index that switches data folders by its manifest), is loaded."""
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    refreshes = []
    refresh = index_search.IndexReader.refresh

    def counted(reader):
        refreshes.append(reader.folder)
        return refresh(reader)

    monkeypatch.setattr(index_search.IndexReader, "refresh", counted)
    with small_app(small_index) as client:  # reload_interval=0: a look before every batch
        opened = len(refreshes)
        for _ in range(5):
            search(client)
        assert len(refreshes) == opened
        set_manifest(index_dir)  # the same content in a new file
        search(client)
        assert len(refreshes) == opened + 1
        random_image(61).save(photos / "more.png")
        index_folder(photos, index_dir)
        assert "more.png" in {Path(h["path"]).name for h in search(client, k=10)["results"]}


def test_a_rebuild_is_loaded_once_not_again_on_the_next_check(small_index, monkeypatch):
    """After a rebuild moved the index to a new data folder, what the server remembers is the look
    of the new database: the next checks find nothing changed instead of opening it a second time."""
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    opened = []
    real_store = index_search.IndexStore

    def counted(*args, **kwargs):
        opened.append(args[0] if args else None)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(index_search, "IndexStore", counted)
    with small_app(small_index) as client:  # reload_interval=0: a look before every batch
        search(client)
        before = len(opened)
        random_image(62).save(photos / "rebuilt.png")
        index_folder(photos, index_dir, "--rebuild")
        for _ in range(4):
            assert "rebuilt.png" in {Path(h["path"]).name for h in search(client, k=10)["results"]}
        assert len(opened) - before == 1  # the rebuilt index's database, opened once


def test_a_damaged_database_gets_503_with_a_sentence_not_500(small_index, caplog):
    index_dir = small_index["index"]
    index_folder(small_index["photos"], index_dir, "--model", str(small_index["bundle"]))
    database = database_of(index_dir)
    with small_app(small_index) as client:
        ids = [h["id"] for h in search(client, k=3)["results"]]
        database.write_bytes(os.urandom(database.stat().st_size))  # the same file, overwritten
        with caplog.at_level(logging.ERROR, logger="mmretrieve.serve.app"):
            for url in (f"/file/{ids[0]}", f"/thumb/{ids[1]}"):
                refused = client.get(url)
                assert refused.status_code == 503 and "rebuild" in refused.json()["error"]
                assert str(index_dir) not in refused.text  # the folder is for the log, not the client
        assert any("--rebuild" in r.getMessage() and str(index_dir) in r.getMessage() for r in caplog.records)


# -- fusion weights, k, /health (item 11) -----------------------------------------------------

def test_weights_whose_sum_overflows_keep_their_ratio():
    np.testing.assert_array_equal(parse_weights("1e308,1e308"), [0.5, 0.5])
    np.testing.assert_allclose(parse_weights((1.7e308, 0.85e308)), [2 / 3, 1 / 3])
    np.testing.assert_array_equal(parse_weights("5e-324,0"), [1.0, 0.0])
    np.testing.assert_allclose(parse_weights("0.3,0.7"), [0.3, 0.7])


@pytest.mark.parametrize("weights, message", [
    ("1e308,1e308", None), ("inf,1", "finite"), ("1,nan", "finite"), ("1e999,1", "finite"),
    ("-1,2", "must not be negative"), ("0,0", "all zero"),
])
def test_fusion_weights_over_http_give_finite_scores_or_one_sentence(small_index, weights, message):
    photos = small_index["photos"]
    index_folder(photos, small_index["index"], "--model", str(small_index["bundle"]))
    query = (photos / "p0.png").read_bytes()
    with small_app(small_index) as client:
        response = upload(client, query, k=3, text="a dog", fusion="mean", weights=weights)
        if message is not None:
            assert response.status_code == 400 and message in response.json()["error"], response.text
            assert "\n" not in response.json()["error"]
            return
        assert response.status_code == 200, response.text
        equal = upload(client, query, k=3, text="a dog", fusion="mean", weights="1,1").json()["results"]
        scores = [h["score"] for h in response.json()["results"]]
        assert all(np.isfinite(scores)) and scores == [h["score"] for h in equal] and max(scores) > 0


def test_k_is_bounded_and_never_beyond_the_index(small_index, monkeypatch):
    index_folder(small_index["photos"], small_index["index"], "--model", str(small_index["bundle"]))
    asked = []
    search_vectors = index_search.IndexReader.search_vectors

    def recorded(reader, queries, k=10, min_score=None):
        asked.append(k)
        return search_vectors(reader, queries, k, min_score)

    monkeypatch.setattr(index_search.IndexReader, "search_vectors", recorded)
    with small_app(small_index) as client:
        for k in ("1000000000000", "99999999999999999999999", "101", "0", "-5"):
            refused = client.get("/api/search", params={"q": "a dog", "k": k})
            assert refused.status_code == 422 and "k must be between 1 and 100" in refused.json()["error"]
            refused = upload(client, (small_index["photos"] / "p0.png").read_bytes(), k=k)
            assert refused.status_code == 422 and "k must be between 1 and 100" in refused.json()["error"]
        assert asked == []
        assert len(search(client, k=100)["results"]) == 3
        assert asked == [3]  # the index holds 3 items, so FAISS is asked for 3 rows, not 100


def test_health_shows_no_filesystem_paths(small_index):
    index_folder(small_index["photos"], small_index["index"], "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        response = client.get("/health")
    body = response.json()
    assert response.status_code == 200 and body["model"]["name"] == small_index["bundle"].name
    assert body["model"]["fingerprint"] and body["model"]["runtime"] == "torch"
    assert set(body["indexes"]["images"]) == {"generation", "items", "index_type"}
    text = response.text
    assert str(small_index["tmp"]) not in text and str(small_index["bundle"]) not in text
    assert os.sep not in json.dumps(body["model"]) and os.sep not in json.dumps(body["indexes"])


def test_public_model_names_keep_names_and_drop_folders(tmp_path):
    from mmretrieve.serve.app import public_model_name

    (tmp_path / "best").mkdir()
    assert public_model_name("default") == "default"
    assert public_model_name("hf-hub:org/model") == "hf-hub:org/model"
    assert public_model_name(str(tmp_path / "best")) == "best"
    assert public_model_name(f"local-dir:{tmp_path / 'best'}") == "local-dir:best"


# -- serve --json (item 19) -------------------------------------------------------------------

def test_serve_json_prints_one_line_when_listening(small_index):
    import urllib.request

    index_folder(small_index["photos"], small_index["index"], "--model", str(small_index["bundle"]))
    code = "import sys; from mmretrieve.cli import main; sys.argv[0] = 'mmretrieve'; main()"
    server = subprocess.Popen([sys.executable, "-c", code, "serve", "--index-dir", str(small_index["index"]),
                               "--host", "127.0.0.1", "--port", "0", "--json",
                               "--thumb-cache", str(small_index["tmp"] / "thumbs")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # the process ends (and this returns '') if it cannot start
        assert line.endswith("\n"), server.stderr.read()
        ready = json.loads(line)
        assert ready["pid"] == server.pid and ready["port"] > 0 and ready["runtime"] == "torch"
        assert ready["url"] == f"http://127.0.0.1:{ready['port']}"
        assert ready["model"]["fingerprint"] and ready["indexes"]["images"]["items"] == 3
        with urllib.request.urlopen(ready["url"] + "/api/search?q=dog&k=2", timeout=60) as response:
            assert len(json.loads(response.read())["results"]) == 2
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert out == "", out  # one line, and the access log went to stderr
    assert '"GET /api/search?q=dog&k=2 HTTP/1.1" 200' in err
