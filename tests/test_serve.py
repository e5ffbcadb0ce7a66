"""The HTTP service in-process (FastAPI's TestClient) over a tiny random model's indexes: search by
text and by image, image->text, health, metrics, thumbnails, files, and every refusal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import random_image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmretrieve.cli import cli  # noqa: E402
from mmretrieve.serve import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.slow
UPLOAD_LIMIT = 200_000
PIXEL_LIMIT = 1_000_000


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_config) -> Path:
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.model import build_model

    torch.manual_seed(0)
    return save_bundle(build_model(tiny_model_config), tmp_path_factory.mktemp("model") / "bundle").path


def index_folder(folder: Path, index_dir: Path, *extra: str) -> None:
    result = CliRunner().invoke(cli, ["index", str(folder), "--index-dir", str(index_dir), "--workers", "0", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def library(tmp_path_factory, bundle) -> dict:
    """Captioned colour images plus a nested folder with an odd name, an image index over all of
    them, and a caption index over the colour captions."""
    from tiny_models import make_colour_dataset

    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    captions = make_colour_dataset(photos / "colours", per_colour=1)
    (photos / "holiday" / "day 2").mkdir(parents=True)
    random_image(1).save(photos / "holiday" / "day 2" / "café ☕.jpg")
    random_image(2, (300, 200)).save(photos / "holiday" / "wide.png")
    index_folder(photos, root / "images", "--model", str(bundle))
    result = CliRunner().invoke(cli, ["index", "--texts", str(captions), "--index-dir", str(root / "texts"),
                                      "--model", str(bundle)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "photos": photos, "captions": captions}


@pytest.fixture(scope="module")
def config(library) -> ServeConfig:
    return ServeConfig(index_dir=library["root"] / "images", text_index_dir=library["root"] / "texts",
                       thumb_cache=library["root"] / "thumbs", max_upload_bytes=UPLOAD_LIMIT, max_pixels=PIXEL_LIMIT,
                       reload_interval=0)


@pytest.fixture(scope="module")
def client(config):
    with TestClient(create_app(config)) as client:
        yield client


def search(client, q="a red dog", **params):
    response = client.get("/api/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    return response.json()


def upload(client, data: bytes, name="query.png", **params):
    return client.post("/api/search/image", params=params, files={"image": (name, data, "image/png")})


def metric(client, name: str, **labels) -> float:
    """One sample's value from /metrics (0 when the series has not appeared yet)."""
    text = client.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


# -- search -------------------------------------------------------------------------------------

def test_text_search_returns_ranked_hits_with_metadata_and_urls(client, library):
    body = search(client, "a red dog", k=3)
    hits = body["results"]
    assert body["query"] == "a red dog" and body["index"] == "images" and body["generation"] >= 1
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    first = hits[0]
    assert {"id", "path", "sha256", "width", "height", "size", "mtime_ns"} <= set(first)
    assert Path(first["path"]).is_relative_to(library["photos"].resolve())
    assert first["thumbnail_url"] == f"/thumb/{first['id']}" and first["file_url"] == f"/file/{first['id']}"
    assert len(search(client, "a red dog", k=50)["results"]) == 9  # every image, and no more
    assert search(client, "a red dog", k=5, min_score=1.01)["results"] == []


def test_image_upload_finds_the_same_image_first(client, library):
    path = library["photos"] / "holiday" / "day 2" / "café ☕.jpg"
    response = upload(client, path.read_bytes(), name="café.jpg", k=2)
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    assert top["path"] == str(path.resolve()) and top["score"] == pytest.approx(1.0, abs=1e-3)
    # The raw body with an image Content-Type works too (curl --data-binary).
    raw = client.post("/api/search/image?k=1", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["results"][0]["path"] == top["path"]


def test_an_image_refined_by_words_is_one_fused_query(client, library):
    path = library["photos"] / "holiday" / "wide.png"
    by_image = upload(client, path.read_bytes(), k=50).json()["results"]
    by_text = search(client, "a blue car", k=50)["results"]
    # Late fusion scores each image by the weighted sum of its two similarities (weights text,image).
    fused = upload(client, path.read_bytes(), k=50, text="a blue car", fusion="late", weights="1,3")
    assert fused.status_code == 200, fused.text
    body = fused.json()
    assert body["text"] == "a blue car" and body["fusion"] == "late" and len(body["results"]) == len(by_image)
    image_scores = {h["path"]: h["score"] for h in by_image}
    text_scores = {h["path"]: h["score"] for h in by_text}
    for hit in body["results"]:
        assert hit["score"] == pytest.approx(0.25 * text_scores[hit["path"]] + 0.75 * image_scores[hit["path"]],
                                             abs=2e-4)
    mean = upload(client, path.read_bytes(), k=3, text="a blue car").json()
    assert mean["fusion"] == "mean" and len(mean["results"]) == 3
    assert metric(client, "mmretrieve_searches_total", query="fused", index="images") >= 2


@pytest.mark.parametrize("params, status, message", [
    ({"text": "  "}, 422, "must not be empty"),
    ({"text": "x" * 1001}, 422, "longer than 1000"),
    ({"fusion": "mean"}, 422, "add text="),
    ({"text": "at night", "fusion": "meen"}, 400, "meen"),
    ({"text": "at night", "weights": "1,-1"}, 400, "must not be negative"),
    ({"text": "at night", "fusion": "gated"}, 400, "has no gated head"),
])
def test_bad_multimodal_queries_get_4xx_with_one_sentence(client, library, params, status, message):
    path = library["photos"] / "holiday" / "wide.png"
    response = upload(client, path.read_bytes(), **params)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_a_late_strategy_without_weights_is_refused_before_it_reaches_the_batch(client, library):
    from mmretrieve.plugins import get_host
    from plugin_fixtures import FusionPlugin

    get_host().register(FusionPlugin(), name="fusion-plugin")
    path = library["photos"] / "holiday" / "wide.png"
    response = upload(client, path.read_bytes(), text="at night", fusion="best-of-both")
    assert response.status_code == 400 and "one vector per item or query" in response.json()["error"]


def test_image_to_text_and_text_to_text_use_the_caption_index(client, library):
    red = next((library["photos"] / "colours" / "images").glob("red*"))
    hits = upload(client, red.read_bytes(), k=3, index="texts").json()["results"]
    assert len(hits) == 3 and all(h["text"] and h["image"] for h in hits)
    # A caption's image is in the image index, so it links to its thumbnail and file.
    assert all(h["thumbnail_url"].startswith("/thumb/") for h in hits)
    linked = client.get(hits[0]["file_url"])
    assert linked.status_code == 200 and linked.content == Path(hits[0]["path"]).read_bytes()
    texts = search(client, "a blue car", k=2, index="texts")["results"]
    assert len(texts) == 2 and all("text" in h for h in texts)


def occupy(client, engine, release: threading.Event):
    """Keep the engine's worker busy until ``release`` is set; returns once it is busy."""
    started = threading.Event()
    blocker = client.portal.start_task_soon(engine.call, lambda readers: started.set() or release.wait(30))
    assert started.wait(30)
    return blocker


def test_queued_queries_are_embedded_as_one_batch_while_the_event_loop_stays_free(client):
    engine = client.app.state.engine
    metrics = client.app.state.metrics
    release, results = threading.Event(), []
    before = (metrics.batch_size.count(), metrics.searches.value("text", "images"))
    blocker = occupy(client, engine, release)
    threads = [threading.Thread(target=lambda q=q: results.append(search(client, q, k=2))) for q in
               ("a dog", "a cat", "a red car", "two people", "a ball", "a hat")]
    for thread in threads:
        thread.start()
    while metrics.in_flight._values.get((), 0) < len(threads):  # all six are waiting on the engine
        threading.Event().wait(0.01)
    assert client.get("/health").status_code == 200  # answered while the engine is busy
    release.set()
    for thread in threads:
        thread.join(30)
    blocker.result(30)
    assert len(results) == 6 and all(len(r["results"]) == 2 for r in results)
    assert metrics.batch_size.count() == before[0] + 1  # one batch for the six queries
    assert metrics.searches.value("text", "images") == before[1] + 6


def test_compute_threads_are_set_on_the_thread_that_embeds(small_index, monkeypatch):
    import torch

    from mmretrieve.index.faiss_lib import faiss
    from mmretrieve.runtime.onnx_runtime import THREADS_ENV
    from mmretrieve.threads import set_torch_threads

    monkeypatch.setenv(THREADS_ENV, "1")  # what the engine would set for onnxruntime, undone afterwards

    index_folder(small_index["photos"], small_index["index"], "--model", str(small_index["bundle"]))
    before = torch.get_num_threads()
    try:
        with small_app(small_index, compute_threads=1) as client:
            engine = client.app.state.engine
            seen = client.portal.call(engine.call, lambda readers: (torch.get_num_threads(),
                                                                   faiss().omp_get_max_threads()))
            assert seen == (1, 1)
    finally:
        set_torch_threads(before)  # torch's count is process-wide (and remembered): leave it as other tests expect


def test_beyond_the_queue_bound_requests_get_503_not_memory(client, config, monkeypatch):
    engine = client.app.state.engine
    monkeypatch.setattr(config, "max_queued", 2)
    release, answers = threading.Event(), []
    blocker = occupy(client, engine, release)
    waiting = [threading.Thread(target=lambda: answers.append(client.get("/api/search?q=dog").status_code))
               for _ in range(2)]
    for thread in waiting:
        thread.start()
    while engine._queue.qsize() < 2:
        threading.Event().wait(0.01)
    busy = client.get("/api/search?q=dog")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
    release.set()
    for thread in waiting:
        thread.join(30)
    blocker.result(30)
    assert answers == [200, 200]
    assert metric(client, "mmretrieve_rejected_requests_total", reason="busy") >= 1


# -- health, metrics, page ----------------------------------------------------------------------

def test_health_reports_what_is_loaded(client):
    for path in ("/health", "/healthz"):
        body = client.get(path).json()
        assert body["status"] == "ok" and body["indexes"]["images"]["items"] == 9
        assert body["indexes"]["texts"]["items"] == 7 * 3 and body["model"]["embed_dim"] == 16
        assert "folder" not in body["indexes"]["images"]  # no paths without a key


def test_metrics_count_requests_by_route_template(client):
    labels = {"route": "/api/search", "method": "GET", "status": "200"}
    before = metric(client, "mmretrieve_http_requests_total", **labels)
    search(client)
    search(client)
    assert metric(client, "mmretrieve_http_requests_total", **labels) == before + 2
    client.get("/thumb/12345678")
    assert metric(client, "mmretrieve_http_requests_total", route="/thumb/{item_id:path}", method="GET",
                  status="404") >= 1
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'mmretrieve_http_request_duration_seconds_bucket{route="/api/search",le="+Inf"}' in text.text
    assert metric(client, "mmretrieve_index_items", index="images") == 9
    assert metric(client, "process_resident_memory_bytes") > 10e6


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="q"' in page.text and 'type="file"' in page.text
    for part in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"(https?:)?//[a-z]", part, re.I), "the page must not load anything from elsewhere"
    assert client.get("/static/../app.py").status_code == 404


# -- thumbnails and files -----------------------------------------------------------------------

def test_thumbnails_are_made_once_then_served_from_the_cache(client, config, library):
    hit = next(h for h in search(client, "wide", k=9)["results"] if h["path"].endswith("wide.png"))
    made, cached = (metric(client, "mmretrieve_thumbnails_total", result=r) for r in ("made", "cached"))
    first = client.get(hit["thumbnail_url"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.size == (300, 200)  # never enlarged
    files = list(config.thumb_cache.rglob("*.jpg"))
    stamp = {f: f.stat().st_mtime_ns for f in files}
    second = client.get(hit["thumbnail_url"])
    assert second.content == first.content and {f: f.stat().st_mtime_ns for f in files} == stamp
    assert metric(client, "mmretrieve_thumbnails_total", result="made") == made + 1
    assert metric(client, "mmretrieve_thumbnails_total", result="cached") == cached + 1
    assert not list(config.thumb_cache.rglob("*.tmp"))
    etag = first.headers["etag"]
    assert client.get(hit["thumbnail_url"], headers={"If-None-Match": etag}).status_code == 304


def test_large_images_get_small_thumbnails(client, library):
    for hit in search(client, "a photo", k=9)["results"]:
        image = Image.open(io.BytesIO(client.get(hit["thumbnail_url"]).content))
        assert max(image.size) <= 320 and image.mode == "RGB"


def test_file_endpoint_sends_the_original(client):
    # Every kind of file in the library, whichever order the (random) tiny model ranks them in.
    hits = {Path(hit["path"]).suffix: hit for hit in search(client, k=50)["results"]}
    assert {".png", ".jpg"} <= set(hits)
    for suffix, content_type in ((".png", "image/png"), (".jpg", "image/jpeg")):
        response = client.get(hits[suffix]["file_url"])
        assert response.status_code == 200 and response.content == Path(hits[suffix]["path"]).read_bytes()
        assert response.headers["content-type"] == content_type
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/file/../../etc/passwd", "/file/..%2F..%2Fetc%2Fpasswd", "/file/%2Fetc%2Fpasswd", "/file//etc/passwd",
    "/file/%2e%2e/%2e%2e/etc/passwd", "/file/1%00", "/file/-1", "/file/0", "/file/99999999", "/file/1.0",
    "/file/0x1", "/file/%EF%BC%91", "/file/99999999999999999999999", "/thumb/..%2Fitems.sqlite",
    "/thumb/%2Fetc%2Fpasswd", "/file/1/../../../etc/passwd", "/file/C:%5Cwindows%5Cwin.ini",
])
def test_paths_instead_of_ids_name_nothing(client, path):
    response = client.get(path)
    assert response.status_code in (403, 404), (path, response.status_code)
    assert "error" in response.json() and "root:" not in response.text


@pytest.mark.parametrize("raw_path", [
    "/file/../../etc/passwd", "/file/..%2f..%2fetc%2fpasswd", "/thumb/../items.sqlite", "/static/../app.py",
    "/file/%2fetc%2fpasswd", "/file/./1/../../../../etc/passwd",
])
def test_dot_segments_sent_verbatim_name_nothing(client, raw_path):
    """As `curl --path-as-is` sends them: HTTP clients in tests would normalise `..` away first."""
    from urllib.parse import unquote

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path), "raw_path": raw_path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] in (403, 404), raw_path
    assert b"root:" not in b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def small_index(tmp_path, bundle):
    """A throwaway index whose folder a test may change."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        random_image(30 + i).save(photos / f"p{i}.png")
    outside = tmp_path / "private"
    outside.mkdir()
    random_image(40).save(outside / "secret.png")
    return {"photos": photos, "outside": outside, "index": tmp_path / "index", "bundle": bundle, "tmp": tmp_path}


def small_app(small_index, **options) -> TestClient:
    config = ServeConfig(index_dir=small_index["index"], thumb_cache=small_index["tmp"] / "thumbs", reload_interval=0,
                         **options)
    return TestClient(create_app(config))


def test_symlink_escapes_are_refused(small_index):
    """A file is sent when its real path lies in a served root (by default the indexed folder),
    whatever links lead there; a link out of it, followed at indexing or planted after, is not."""
    photos, outside = small_index["photos"], small_index["outside"]
    os.symlink(outside / "secret.png", photos / "link.png")  # a link out, planted before indexing
    (photos / "album").mkdir()
    os.symlink(photos / "p0.png", photos / "album" / "again.png")  # a link that stays inside
    os.symlink(photos / "album", photos / "album-link")  # so does a folder link
    index_folder(photos, small_index["index"], "--model", str(small_index["bundle"]), "--follow-links")
    with small_app(small_index) as client:  # the default roots: the indexed folder
        hits = {Path(h["path"]).name: h for h in search(client, k=10)["results"]}
        assert set(hits) == {"p0.png", "p1.png", "p2.png", "link.png"}  # one item per file, as found
        for url in (hits["link.png"]["file_url"], hits["link.png"]["thumbnail_url"]):
            refused = client.get(url)
            assert refused.status_code == 403 and "outside the folders" in refused.json()["error"]
        assert client.get(hits["p0.png"]["file_url"]).status_code == 200
        # An indexed file swapped for a link afterwards is not followed out either ...
        (photos / "p1.png").unlink()
        os.symlink(outside / "secret.png", photos / "p1.png")
        for url in (hits["p1.png"]["file_url"], hits["p1.png"]["thumbnail_url"]):
            refused = client.get(url)
            assert refused.status_code == 403 and "outside the folders" in refused.json()["error"]
        # ... while one to a file inside the folder is what the folder already shares.
        (photos / "p1.png").unlink()
        os.symlink(photos / "album-link" / "again.png", photos / "p1.png")
        sent = client.get(hits["p1.png"]["file_url"])
        assert sent.status_code == 200 and sent.content == (photos / "p0.png").read_bytes()
        (photos / "p2.png").unlink()
        assert client.get(hits["p2.png"]["file_url"]).status_code == 404
    with small_app(small_index, roots=(photos, outside)) as client:  # --root may widen it
        assert client.get(hits["link.png"]["file_url"]).status_code == 200


def test_a_new_generation_is_picked_up_without_restart(small_index):
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        generation = client.get("/health").json()["indexes"]["images"]["generation"]
        random_image(77).save(photos / "new.png")
        before = upload(client, (photos / "new.png").read_bytes(), k=10).json()["results"]
        assert "new.png" not in {Path(h["path"]).name for h in before}
        index_folder(photos, index_dir)  # `mmretrieve index` again, while the server runs
        after = upload(client, (photos / "new.png").read_bytes(), k=1).json()
        assert Path(after["results"][0]["path"]).name == "new.png" and after["generation"] > generation
        assert client.get(after["results"][0]["thumbnail_url"]).status_code == 200
        health = client.get("/health").json()["indexes"]["images"]
        assert health["items"] == 4 and health["generation"] == after["generation"]
        assert metric(client, "mmretrieve_index_reloads_total", index="images") == 1


def test_a_rebuilt_index_is_reopened(small_index):
    photos, index_dir = small_index["photos"], small_index["index"]
    index_folder(photos, index_dir, "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        old = search(client, k=10)["results"]
        (photos / "p0.png").unlink()
        index_folder(photos, index_dir, "--rebuild", "--index-type", "hnsw")  # a new items.sqlite
        new = search(client, k=10)["results"]
        assert {Path(h["path"]).name for h in new} == {"p1.png", "p2.png"} and len(old) == 3
        assert all(client.get(h["thumbnail_url"]).status_code == 200 for h in new)  # the catalog followed
        assert client.get("/health").json()["indexes"]["images"]["index_type"] == "hnsw"


def test_an_index_rebuilt_with_another_model_is_refused_until_restart(small_index, tiny_model_config, tmp_path):
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.model import build_model

    index_folder(small_index["photos"], small_index["index"], "--model", str(small_index["bundle"]))
    with small_app(small_index) as client:
        torch.manual_seed(1)
        other = save_bundle(build_model(tiny_model_config), tmp_path / "other").path
        index_folder(small_index["photos"], small_index["index"], "--model", str(other), "--rebuild")
        response = client.get("/api/search", params={"q": "a dog"})
        assert response.status_code == 503 and "restart the server" in response.json()["error"]
        assert client.get("/health").status_code == 503


# -- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({}, "must not be empty"), ({"q": ""}, "must not be empty"), ({"q": "   "}, "must not be empty"),
    ({"q": "x" * 1001}, "longer than 1000"), ({"q": "dog", "k": "0"}, "k must be between 1 and 100"),
    ({"q": "dog", "k": "1000"}, "k must be between"), ({"q": "dog", "k": "ten"}, "k: Input should be a valid integer"),
    ({"q": "dog", "min_score": "high"}, "min_score: "), ({"q": "dog", "index": "videos"}, "index must be"),
])
def test_malformed_queries_get_422_with_one_sentence(client, params, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == 422 and message in response.json()["error"]
    assert "\n" not in response.json()["error"]


def test_oversized_uploads_get_413_without_being_read_whole(client, config):
    big = os.urandom(UPLOAD_LIMIT + 50_000)
    declared = upload(client, big)
    assert declared.status_code == 413 and "limit of" in declared.json()["error"]

    def chunked():  # no Content-Length: the limit is enforced as the body streams in
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    streamed = client.post("/api/search/image", content=chunked(), headers={"Content-Type": "image/jpeg"})
    assert streamed.status_code == 413
    assert metric(client, "mmretrieve_rejected_requests_total", reason="too_large") >= 2


def test_decompression_bombs_get_413(client):
    bomb = png_bytes(Image.new("L", (2000, 1000)))  # a few KB on the wire, 2 MP once decoded
    assert len(bomb) < UPLOAD_LIMIT
    response = upload(client, bomb)
    assert response.status_code == 413 and "pixels" in response.json()["error"]


@pytest.mark.parametrize("data, content_type, status, message", [
    (b"%PDF-1.4 not an image", "application/pdf", 415, "not an image file"),
    (b"hello", "text/plain", 415, "not an image file"),
    (b"", "image/png", 400, "empty"),
])
def test_non_images_get_415_and_broken_ones_400(client, data, content_type, status, message):
    response = client.post("/api/search/image", files={"image": ("q.bin", data, content_type)})
    assert response.status_code == status and message in response.json()["error"]


def test_truncated_images_and_odd_requests_get_4xx(client, library):
    whole = png_bytes(random_image(9, (200, 200)))
    truncated = upload(client, whole[: len(whole) // 2])
    assert truncated.status_code == 400 and "unreadable" in truncated.json()["error"]
    no_file = client.post("/api/search/image", data={"note": "no file here"},
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert no_file.status_code == 400
    form_without_file = client.post("/api/search/image", files={"other": (None, "text")})
    assert form_without_file.status_code == 400 and "field" in form_without_file.json()["error"]
    text_body = client.post("/api/search/image", content=b"a dog", headers={"Content-Type": "text/plain"})
    assert text_body.status_code == 415 and "multipart/form-data" in text_body.json()["error"]
    assert client.get("/api/search/image").status_code == 405
    assert client.get("/nowhere").json() == {"error": "no such page"}


def test_api_key_is_required_when_set(client, config, monkeypatch):
    monkeypatch.setattr(config, "api_key", "s3cret key")
    hit_urls = ["/thumb/1", "/file/1"]
    for url in ["/api/search?q=dog", *hit_urls]:
        refused = client.get(url)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.get("/api/search?q=dog", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/api/search?q=dog", headers={"X-API-Key": "s3cret key"}).status_code == 200
    assert client.get("/api/search?q=dog", headers={"Authorization": "Bearer s3cret key"}).status_code == 200
    assert upload(client, b"x").status_code == 401  # refused before the upload is looked at
    client.cookies.set("mmretrieve_api_key", "s3cret%20key")  # what the page stores
    try:
        assert client.get("/file/1").status_code == 200
    finally:
        client.cookies.clear()
    for open_path in ("/", "/health", "/metrics", "/static/app.js"):
        assert client.get(open_path).status_code == 200


def test_serve_command_refuses_a_missing_index(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--index-dir", str(tmp_path / "none")])
    assert result.exit_code != 0 and "holds no index" in result.output


def test_help_imports_no_web_stack():
    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', [m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules], "
            "file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "LOADED []" in result.stderr, result.stderr
