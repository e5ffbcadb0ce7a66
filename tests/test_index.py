"""Indexing and search end to end on a tiny random model: bad files, incremental updates,
kill-and-resume, model mismatch, the writer lock, every output format, the library API."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner

from conftest import BAD_IMAGES, GOOD_IMAGES, random_image
from mmretrieve.bundle import save_bundle
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images, index_texts, remove_files
from mmretrieve.index.lock import WriterLock
from mmretrieve.index.search import IndexReader
from mmretrieve.index.store import IndexStore
from mmretrieve.plugins import reset_host
from mmretrieve.runtime.torch_runtime import TorchEmbedder

pytestmark = pytest.mark.slow


def test_torch_runtime_texts_sorted_by_length_embed_as_one_by_one(embedder):
    import numpy as np

    texts = [" ".join(["word"] * (1 + (7 * i) % 23)) + f" {i}" for i in range(40)]  # lengths 2..24, shuffled
    together = embedder.embed_texts(texts)
    alone = np.concatenate([embedder.embed_texts([t]) for t in texts])
    assert together.shape == (40, embedder.embed_dim)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def names(hits):
    return {os.path.basename(hit.path) for hit in hits}


def build(root, index_dir, embedder, **options):
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return index_images(root, index_dir, embedder, **options)


def test_messy_folder_indexes_the_good_files_and_lists_the_bad(messy_image_folder, tmp_path, embedder):
    report = build(messy_image_folder, tmp_path / "idx", embedder)
    assert report.total == len(GOOD_IMAGES) and report.added == len(GOOD_IMAGES)
    assert {os.path.basename(f["path"]) for f in report.failed} == BAD_IMAGES
    reader = IndexReader(tmp_path / "idx", embedder=embedder)
    for name in ("a.jpg", "café ☕.webp"):
        path = next(p for p in messy_image_folder.rglob(name))
        top = reader.search_image([path], k=1)[0][0]
        assert os.path.basename(top.path) == name and top.score == pytest.approx(1.0, abs=1e-4)
        assert top.item.width and top.item.height and len(top.item.sha256) == 64


def test_reindex_after_add_modify_touch_delete(messy_image_folder, tmp_path, embedder):
    index_dir = tmp_path / "idx"
    build(messy_image_folder, index_dir, embedder)
    again = build(messy_image_folder, index_dir, embedder)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, len(GOOD_IMAGES))
    assert len(again.failed) == len(BAD_IMAGES)  # still listed, not retried

    random_image(10).save(messy_image_folder / "new.png")
    random_image(11).save(messy_image_folder / "a.jpg")  # new content
    b = messy_image_folder / "holiday" / "b.png"
    os.utime(b, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # same bytes, new mtime
    (messy_image_folder / "holiday" / "tall.bmp").unlink()
    report = build(messy_image_folder, index_dir, embedder)
    assert (report.added, report.updated, report.touched, report.removed) == (1, 1, 1, 1)
    assert report.total == len(GOOD_IMAGES)

    reader = IndexReader(index_dir, embedder=embedder)
    everything = reader.search_image([messy_image_folder / "new.png"], k=50)[0]
    assert "tall.bmp" not in names(everything) and "new.png" in names(everything)
    top = reader.search_image([messy_image_folder / "a.jpg"], k=1)[0][0]
    assert top.score == pytest.approx(1.0, abs=1e-4)  # the new content is what is indexed


def test_a_fixed_bad_file_is_retried(messy_image_folder, tmp_path, embedder):
    build(messy_image_folder, tmp_path / "idx", embedder)
    random_image(3).save(messy_image_folder / "corrupt.png")
    report = build(messy_image_folder, tmp_path / "idx", embedder)
    assert report.added == 1 and "corrupt.png" not in {os.path.basename(f["path"]) for f in report.failed}


def test_killed_run_resumes_without_redoing_work(messy_image_folder, tmp_path, embedder, monkeypatch):
    for i in range(6):
        random_image(20 + i).save(messy_image_folder / f"extra{i}.png")
    index_dir = tmp_path / "idx"
    build(messy_image_folder / "holiday", index_dir, embedder)  # a first published generation
    published = IndexReader(index_dir, embedder=embedder)
    before = (published.generation, len(published.index))

    calls = {"n": 0}
    original = embedder.embed_pixels

    def dies_on_second_batch(pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(pixels)

    monkeypatch.setattr(embedder, "embed_pixels", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build(messy_image_folder, index_dir, embedder, batch_size=2)
    # Readers still see the last complete state.
    reader = IndexReader(index_dir, embedder=embedder)
    assert (reader.generation, len(reader.index)) == before

    monkeypatch.setattr(embedder, "embed_pixels", original)
    embedded = []
    monkeypatch.setattr(embedder, "embed_pixels", lambda p: embedded.append(len(p)) or original(p))
    report = build(messy_image_folder, index_dir, embedder, batch_size=2)
    assert report.total == len(GOOD_IMAGES) + 6
    # The batch embedded before the kill was kept: only the rest was embedded again.
    assert sum(embedded) == report.total - 3 - 2  # 3 from the first run, 2 staged before the kill


def test_intermediate_commits_publish_generations(messy_image_folder, tmp_path, embedder):
    report = build(messy_image_folder, tmp_path / "idx", embedder, batch_size=1, commit_every=2)
    assert report.generation == 2  # 4 images, published every 2; nothing left for a final publish
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        assert [p.name for p in (store.data_folder / "vectors").glob("gen-*")] == ["gen-000002"]  # old ones go


def add_photos(folder, numbers):
    folder.mkdir(exist_ok=True)
    for n in numbers:
        random_image(200 + n).save(folder / f"p{n:02d}.png")


@pytest.fixture
def publish_sizes(monkeypatch):
    """The items the index holds after each publish of a run (builder.publish recorded)."""
    from mmretrieve.index import builder

    sizes, original = [], builder.publish
    monkeypatch.setattr(builder, "publish",
                        lambda store, *args: (original(store, *args), sizes.append(store.count()))[0])
    return sizes


def test_publishes_on_the_way_come_further_apart_as_the_index_grows(tmp_path, embedder, publish_sizes):
    # Each publish rewrites the whole FAISS index: a run publishing every commit_every items wrote
    # O(N^2) vectors. After the first commit_every, a run publishes once it has embedded as many
    # items as the index held at its last publish.
    from mmretrieve.index import builder

    photos = tmp_path / "photos"
    add_photos(photos, range(12))
    sizes = publish_sizes
    report = build(photos, tmp_path / "idx", embedder, batch_size=1, commit_every=2)
    assert sizes == [2, 4, 8, 12] and report.generation == 4 and report.total == 12  # every 2 would be 6 publishes
    add_photos(photos, range(12, 16))
    sizes.clear()
    report = build(photos, tmp_path / "idx", embedder, batch_size=1, commit_every=2)
    assert sizes == [16] and report.generation == 5  # 4 new items in an index of 12: only the final publish
    assert [builder.publish_due(since, 0, 5000, 896) for since in (4999, 5000)] == [False, True]
    assert [builder.publish_due(since, 20_000, 5000, 896) for since in (19_999, 20_000)] == [False, True]
    # a publish reads every staged vector at once: at most 256 MiB of them wait (74,898 of 896-d)
    assert [builder.publish_due(since, 10**6, 5000, 896) for since in (74_897, 74_898)] == [False, True]


def test_a_resumed_run_counts_the_rows_the_killed_run_left_staged(tmp_path, embedder, monkeypatch, publish_sizes):
    photos = tmp_path / "photos"
    add_photos(photos, range(12))
    original_embed, calls = embedder.embed_pixels, []

    def fails_on_seventh(pixels):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return original_embed(pixels)

    monkeypatch.setattr(embedder, "embed_pixels", fails_on_seventh)
    with pytest.raises(RuntimeError, match="killed"):
        build(photos, tmp_path / "idx", embedder, batch_size=1, commit_every=2)
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        assert (store.count(), store.count("staged")) == (4, 2)  # published at 2 and 4; 5 and 6 staged
    monkeypatch.setattr(embedder, "embed_pixels", original_embed)
    publish_sizes.clear()  # the killed run's publishes
    report = build(photos, tmp_path / "idx", embedder, batch_size=1, commit_every=2)
    assert publish_sizes == [8, 12] and report.total == 12  # the 2 left staged and 2 new make the 4 the index held


def test_other_model_is_refused_for_search_and_for_indexing(messy_image_folder, tmp_path, embedder, tiny_model_config):
    import torch

    from mmretrieve.model import build_model

    build(messy_image_folder, tmp_path / "idx", embedder)
    torch.manual_seed(123)
    other = TorchEmbedder(str(save_bundle(build_model(tiny_model_config), tmp_path / "other").path), device="cpu")
    with pytest.raises(InputError, match="was built with model .* search with the model that built it"):
        IndexReader(tmp_path / "idx", embedder=other)
    with pytest.raises(InputError, match="pass --rebuild"):
        build(messy_image_folder, tmp_path / "idx", other)
    report = build(messy_image_folder, tmp_path / "idx", other, rebuild=True)
    assert report.added == len(GOOD_IMAGES)
    IndexReader(tmp_path / "idx", embedder=other)  # now it matches


def test_a_second_writer_is_refused(messy_image_folder, tmp_path, embedder):
    with WriterLock(tmp_path / "idx"):
        with pytest.raises(InputError, match=r"another mmretrieve process \(pid \d+\) is writing"):
            build(messy_image_folder, tmp_path / "idx", embedder)


def test_newer_index_format_is_refused(messy_image_folder, tmp_path, embedder):
    build(messy_image_folder, tmp_path / "idx", embedder)
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert {"model", "embed_dim", "metric", "normalized", "index_type", "counts", "format_version",
            "mmretrieve_version"} <= set(manifest)
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="newer than this mmretrieve.*pip install -U"):
        IndexReader(tmp_path / "idx")


def test_empty_folder_and_include_exclude(tmp_path, messy_image_folder, embedder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files to index"):
        build(tmp_path / "empty", tmp_path / "idx-empty", embedder)
    report = build(messy_image_folder, tmp_path / "idx", embedder, include=("holiday/*",), exclude=("*.bmp",))
    assert report.total == 2  # b.png and café ☕.webp


def test_remove_files(messy_image_folder, tmp_path, embedder):
    build(messy_image_folder, tmp_path / "idx", embedder)
    assert remove_files(tmp_path / "idx", [messy_image_folder / "a.jpg", messy_image_folder / "nope.jpg"]) == 1
    reader = IndexReader(tmp_path / "idx", embedder=embedder)
    assert len(reader.index) == len(GOOD_IMAGES) - 1


def test_text_index_for_image_to_text_search(tmp_path, embedder, messy_image_folder):
    from tiny_models import make_colour_dataset

    data = make_colour_dataset(tmp_path / "colours", per_colour=2)
    report = index_texts(data, tmp_path / "texts", embedder, progress=False)
    assert report.total == 7 * 2 * 3
    again = index_texts(data, tmp_path / "texts", embedder, progress=False)
    assert (again.added, again.unchanged) == (0, report.total)
    reader = IndexReader(tmp_path / "texts", embedder=embedder)
    hits = reader.search_image([messy_image_folder / "a.jpg"], k=3)[0]
    assert len(hits) == 3 and all(h.item.text and h.as_dict()["path"].endswith(".png") for h in hits)
    with pytest.raises(InputError, match="indexes texts, not images"):
        build(messy_image_folder, tmp_path / "texts", embedder)


@pytest.fixture
def cli_index(messy_image_folder, tmp_path, bundle, monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_INDEX_ROOT", str(tmp_path / "indexes"))
    result = CliRunner().invoke(cli, ["index", str(messy_image_folder), "--model", str(bundle), "--workers", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_index_command_reports_and_lists_skips(cli_index):
    assert f"{len(GOOD_IMAGES)} items" in cli_index.stdout and f"failed {len(BAD_IMAGES)}" in cli_index.stdout
    assert "skipped" in cli_index.stderr and "zero.jpg" in cli_index.stderr


def test_search_command_output_formats(cli_index, messy_image_folder):
    runner = CliRunner()
    table = runner.invoke(cli, ["search", "a black cat", "-k", "3"])
    assert table.exit_code == 0 and len(table.stdout.strip().splitlines()) == 3
    hits = json.loads(runner.invoke(cli, ["search", "a black cat", "-k", "3", "--json"]).stdout)
    assert len(hits) == 3 and {"path", "score", "rank"} <= set(hits[0])
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    paths = runner.invoke(cli, ["search", "a black cat", "-k", "2", "--paths"]).stdout.splitlines()
    assert paths == [h["path"] for h in hits[:2]]
    several = json.loads(runner.invoke(cli, ["search", "a cat", "a dog", "-k", "2", "--json"]).stdout)
    assert [s["query"] for s in several] == ["a cat", "a dog"]
    piped = runner.invoke(cli, ["search", "-", "-k", "1", "--json"], input="a cat\na dog\n")
    assert len(json.loads(piped.stdout)) == 2
    strict = runner.invoke(cli, ["search", "a black cat", "--min-score", "1.01"])
    assert "no results scoring at least 1.01" in strict.stdout
    by_image = json.loads(runner.invoke(cli, ["search", "--image", str(messy_image_folder / "a.jpg"), "-k", "1",
                                              "--json"]).stdout)
    assert by_image[0]["path"].endswith("a.jpg")


def test_index_command_mistakes(tmp_path, monkeypatch, bundle):
    monkeypatch.setenv("MMRETRIEVE_INDEX_ROOT", str(tmp_path / "indexes"))
    monkeypatch.setenv("MMRETRIEVE_BLOCK_PLUGINS", "offline-towers")  # the plugin that registers `default`
    reset_host()  # the bundle fixture loaded plugins before the block was set
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(tmp_path)])
    assert result.exit_code != 0 and "no plugin provides a `default` model: give --model MODEL" in result.output
    result = runner.invoke(cli, ["search", "x"])
    assert result.exit_code != 0 and "holds no index" in result.output
    result = runner.invoke(cli, ["search"])
    assert result.exit_code != 0 and "give text QUERY arguments or --image PATH" in result.output


def test_library_api(messy_image_folder, tmp_path, bundle):
    import mmretrieve.api as mm

    index = mm.build_index(messy_image_folder, str(bundle), tmp_path / "idx", workers=0, progress=False)
    assert len(index) == len(GOOD_IMAGES)
    hits = index.search("a dog on the beach", k=2)
    assert len(hits) == 2 and hits[0].score >= hits[1].score
    random_image(99).save(messy_image_folder / "later.png")
    report = index.update(messy_image_folder, workers=0, progress=False)
    assert report.added == 1 and len(index) == len(GOOD_IMAGES) + 1
    assert index.search_image(messy_image_folder / "later.png", k=1)[0].path.endswith("later.png")
    assert index.remove([messy_image_folder / "later.png"]) == 1 and len(index) == len(GOOD_IMAGES)
    reopened = mm.open_index(tmp_path / "idx")  # the model comes from the index's manifest
    assert reopened.search("a dog on the beach", k=2)[0].path == hits[0].path
