"""The bad-input corpus (tests/bad_inputs.py) through every entry point that reads images:
the readers themselves, `index` (twice), search by image, data loading for train and eval, and
the service's upload and thumbnail endpoints, each case against its expected outcome."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bad_inputs import Case, expected_index, make_corpus
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.images import ImageInputError, load_image
from mmretrieve.decode import decode_one

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("corpus") / "files"
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_config) -> Path:
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.model import build_model

    torch.manual_seed(0)
    return save_bundle(build_model(tiny_model_config), tmp_path_factory.mktemp("model") / "bundle").path


@pytest.fixture(scope="module")
def embedder(bundle):
    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    return TorchEmbedder(str(bundle), device="cpu")


@pytest.fixture(scope="module")
def indexed(corpus, embedder, tmp_path_factory):
    """The corpus indexed once, then again: (index folder, first report, second report, decodes in run 2)."""
    import mmretrieve.decode as pool
    import mmretrieve.index.builder as builder

    root, _ = corpus
    index_dir = tmp_path_factory.mktemp("index") / "idx"
    first = builder.index_images(root, index_dir, embedder, workers=0, progress=False)
    decoded = []
    original = pool.decode_one
    pool.decode_one = lambda path, preprocessor=None: decoded.append(path) or original(path, preprocessor)
    try:
        second = builder.index_images(root, index_dir, embedder, workers=0, progress=False)
    finally:
        pool.decode_one = original
    return index_dir, first, second, decoded


def _listed(report) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in [*report.failed, *report.skipped]}


def test_every_reader_gives_each_case_its_outcome(corpus):
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    root, cases = corpus
    preprocessor = ImagePreprocessor(ImagePreprocessConfig(size=32))
    wrong = []
    for case in cases:
        path = case.path(root)
        decoded = decode_one(str(path), preprocessor)
        try:
            image = load_image(path)
        except ImageInputError as exc:
            if case.usable or case.reason not in exc.reason.lower():
                wrong.append(f"{case.kind}: load_image refused it: {exc.reason}")
            if decoded.error is None or case.reason not in decoded.error.lower():
                wrong.append(f"{case.kind}: decode_one gave {decoded.error!r}")
            continue
        problem = case.check(image) if case.check else None
        if not case.usable or problem or image.mode != "RGB":
            wrong.append(f"{case.kind}: loaded as {image.mode} {image.size}: {problem or 'expected a refusal'}")
        if decoded.error or decoded.pixels.shape != (32, 32, 3) or decoded.pixels.dtype != np.uint8:
            wrong.append(f"{case.kind}: decode_one gave {decoded.error!r}")
    assert not wrong, "\n".join(wrong)


def test_index_indexes_the_usable_and_lists_the_rest_with_reasons(corpus, indexed):
    from mmretrieve.index.store import IndexStore

    root, cases = corpus
    index_dir, first, _, _ = indexed
    resolved = str(root.resolve())
    listed = _listed(first)
    with IndexStore.open(index_dir, readonly=True) as store:
        paths = set(store.known_files())
    wrong = []
    for case in cases:
        path = os.path.join(resolved, case.name)
        expected = expected_index(case)
        if expected == "indexed":
            ok = path not in listed and path in paths
        elif expected == "absent":
            ok = path not in listed and path not in paths
        else:
            ok = case.index_words in listed.get(path, "").lower()
        if not ok:
            wrong.append(f"{case.kind}: expected {expected}, listed as {listed.get(path)!r}")
    assert not wrong, "\n".join(wrong)
    assert first.total == sum(case.usable for case in cases)


def test_a_rerun_skips_what_failed_before_without_decoding_it_again(indexed):
    _, first, second, decoded = indexed
    assert decoded == []  # nothing changed: no file is read again, the bad ones included
    assert {f["path"]: f["reason"] for f in second.failed} == {f["path"]: f["reason"] for f in first.failed}
    assert (second.added, second.updated, second.removed, second.total) == (0, 0, 0, first.total)


def test_search_by_image_finds_each_usable_file_and_refuses_the_rest_in_one_sentence(corpus, indexed, embedder):
    from mmretrieve.index.search import IndexReader

    root, cases = corpus
    reader = IndexReader(indexed[0], embedder=embedder)
    wrong = []
    try:
        for case in cases:
            try:
                top = reader.search_image([case.path(root)], k=1)[0][0]
            except InputError as exc:
                if case.usable or case.reason not in str(exc).lower() or "\n" in str(exc):
                    wrong.append(f"{case.kind}: refused: {exc}")
                continue
            if not case.usable or top.score < 0.999:
                wrong.append(f"{case.kind}: top hit {top.path} at {top.score:.4f}")
    finally:
        reader.close()
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name, words", [("strip_16k.png", "aspect ratio of 16000:1"),
                                         ("fifo.jpg", "is a fifo (named pipe)")])
def test_search_command_refuses_a_bad_query_image_in_one_line(corpus, indexed, name, words):
    root, _ = corpus
    result = CliRunner().invoke(cli, ["search", "--image", str(root / name), "--index-dir", str(indexed[0])])
    assert result.exit_code == 1 and words in result.output.lower()
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_data_loading_keeps_the_usable_and_skips_the_rest_with_reasons(corpus, embedder, tmp_path):
    from mmretrieve.data import load_captions
    from mmretrieve.evaluate import embed_with_embedder

    root, cases = corpus
    records = [{"image": str(case.path(root)), "captions": [f"a picture: {case.kind}"]} for case in cases]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    checked = load_captions(tmp_path / "captions.jsonl", workers=2)
    reasons = dict(checked.skipped)
    assert {item.image.name for item in checked.items} == {case.path(root).name for case in cases if case.usable}
    for case in cases:
        if not case.usable:
            assert case.reason in reasons[str(case.path(root))].lower(), case.kind
    images, texts = embed_with_embedder(embedder, checked.items, batch_size=4, progress=False)  # eval's reader
    assert images.shape[0] == len(checked.items) and np.isfinite(images).all()

    # Without decoding, what the file system tells is enough to skip what is no regular file.
    listed = load_captions(tmp_path / "captions.jsonl", check_images=False)
    unread = dict(listed.skipped)
    for name, words in (("fifo.jpg", "fifo"), ("dev_zero.jpg", "device"), ("folder.jpg", "folder"),
                        ("huge.jpg", "256 mb limit"), ("dangling.jpg", "no such file")):
        assert words in unread[str(root / name)].lower(), name


def test_training_reads_only_what_data_loading_kept(corpus, embedder, tmp_path):
    from mmretrieve.data import load_captions
    from mmretrieve.train.pipeline import PairDataset, caption_offsets

    root, cases = corpus
    records = [{"image": str(case.path(root)), "caption": case.kind} for case in cases]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    items = load_captions(tmp_path / "train.jsonl", workers=2).items

    class Tower:
        preprocessor = embedder.image_preprocessor

    dataset = PairDataset(items, Tower(), caption_offsets(items))
    samples = [dataset[(index, 0)] for index in range(len(items))]
    assert all(s["pixel_values"].shape == (3, *embedder.image_preprocessor.transform(
        Image.new("RGB", (8, 8))).shape[1:]) for s in samples)


def test_the_upload_endpoint_answers_each_case(corpus, indexed, tmp_path):
    fastapi = pytest.importorskip("fastapi")  # noqa: F841
    from fastapi.testclient import TestClient

    from mmretrieve.serve import ServeConfig, create_app

    root, cases = corpus
    config = ServeConfig(index_dir=indexed[0], thumb_cache=tmp_path / "thumbs", reload_interval=0)
    wrong = []
    with TestClient(create_app(config)) as client:
        for case in cases:
            if case.upload is None:
                continue
            data = case.path(root).read_bytes()
            response = client.post("/api/search/image", params={"k": 1}, files={"image": ("q", data, "image/png")})
            body = response.json()
            if response.status_code != case.upload:
                wrong.append(f"{case.kind}: HTTP {response.status_code} {body}")
            elif response.status_code == 200:
                top = body["results"][0]
                if top["score"] < 0.999:
                    wrong.append(f"{case.kind}: top hit {top['path']} at {top['score']}")
                thumbnail = client.get(top["thumbnail_url"])
                if thumbnail.status_code != 200:
                    wrong.append(f"{case.kind}: thumbnail HTTP {thumbnail.status_code}")
            elif "\n" in body["error"] or not body["error"]:
                wrong.append(f"{case.kind}: error {body['error']!r}")
        grey = next(c for c in cases if c.name == "grey16.png")
        hit = client.post("/api/search/image", params={"k": 1},
                          files={"image": ("q", grey.path(root).read_bytes(), "image/png")}).json()["results"][0]
        thumbnail = Image.open(io.BytesIO(client.get(hit["thumbnail_url"]).content))
        assert 100 < np.asarray(thumbnail.convert("L")).mean() < 155  # a grey ramp, not all white
    assert not wrong, "\n".join(wrong)


def test_a_thin_strip_upload_is_refused_before_its_pixels_are_decoded(monkeypatch):
    from mmretrieve.serve.problems import RequestProblem
    from mmretrieve.serve.uploads import decode_upload

    def no_decoding(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr("mmretrieve.serve.uploads.load_image", no_decoding)
    data = io.BytesIO()
    Image.new("RGB", (1, 16000)).save(data, "PNG")
    with pytest.raises(RequestProblem) as refused:
        decode_upload(data.getvalue(), "strip.png", 40_000_000)
    assert refused.value.status == 422 and "aspect ratio of 16000:1" in str(refused.value)


def test_an_indexed_file_swapped_for_a_fifo_is_refused_not_waited_on(tmp_path, embedder):
    import threading

    from fastapi.testclient import TestClient

    from mmretrieve.index.builder import index_images
    from mmretrieve.serve import ServeConfig, create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(photos / "a.png")
    index_images(photos, tmp_path / "idx", embedder, workers=0, progress=False)
    (photos / "a.png").unlink()
    os.mkfifo(photos / "a.png")
    answers = {}
    with TestClient(create_app(ServeConfig(index_dir=tmp_path / "idx", thumb_cache=tmp_path / "thumbs",
                                           reload_interval=0))) as client:
        item = client.get("/api/search", params={"q": "green"}).json()["results"][0]

        def ask():
            for url in (item["file_url"], item["thumbnail_url"]):
                answers[url] = client.get(url).status_code

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(30)
        if asking.is_alive():  # release the blocked open() so the test can end, then fail
            for _ in range(2):
                with open(photos / "a.png", "wb"):
                    pass
            pytest.fail("serving a FIFO blocked")
    assert answers == {item["file_url"]: 403, item["thumbnail_url"]: 403}
