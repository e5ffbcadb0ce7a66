"""Issue 13, small items: a huge -k, NUL-ended paths, `~` in the Python API, a model given by a
relative path, and `info` on a reduced-precision export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import random_image
from tiny_models import make_colour_dataset

import mmretrieve.api as mm
from mmretrieve.bundle import save_bundle
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images
from mmretrieve.index.search import IndexReader
from mmretrieve.runtime import load_embedder

NEWLINE_NAME = "two\nlines.png"


@pytest.fixture(scope="module")
def bundle(tiny_model_config, tmp_path_factory) -> Path:
    import torch

    from mmretrieve.model import build_model

    torch.manual_seed(0)
    return save_bundle(build_model(tiny_model_config), tmp_path_factory.mktemp("hardening") / "bundle").path


def make_photos(root: Path) -> Path:
    root.mkdir(parents=True)
    for seed, name in enumerate(["a.png", "b.png", NEWLINE_NAME]):
        random_image(seed).save(root / name)
    return root


@pytest.fixture(scope="module")
def index_dir(bundle, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("indexed")
    photos = make_photos(base / "photos")
    index_images(photos, base / "idx", load_embedder(str(bundle), "torch", "cpu"), workers=0, progress=False)
    return base / "idx"


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def test_a_k_beyond_the_index_size_returns_every_item(bundle, index_dir):
    result = invoke("search", "a dog", "--index-dir", index_dir, "--model", bundle, "-k", 10**12, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
    index = mm.open_index(index_dir, model=str(bundle), runtime="torch", device="cpu")
    assert len(index.search("a dog", k=10**12)) == 3
    reader = IndexReader(index_dir, model=str(bundle), runtime="torch", device="cpu")
    for k in (0, 2.5, True, "3"):
        with pytest.raises(InputError, match="k must be a whole number of at least 1"):
            reader.search_text(["a dog"], k)
    assert "0 is not in the range x>=1" in invoke("search", "a dog", "--index-dir", index_dir, "-k", 0).output


def test_null_ended_paths_keep_a_name_with_a_newline_whole(bundle, index_dir):
    photos = index_dir.parent / "photos"
    for flag in ("-0", "--null"):
        result = invoke("search", "a dog", "--index-dir", index_dir, "--model", bundle, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.endswith("\0") and "\n" not in result.stdout.replace(NEWLINE_NAME, "")
        expected = sorted(str(photos / name) for name in ("a.png", "b.png", NEWLINE_NAME))
        assert sorted(result.stdout.split("\0")[:-1]) == expected
    lines = invoke("search", "a dog", "--index-dir", index_dir, "--model", bundle, "--paths")
    assert len(lines.stdout.splitlines()) == 4  # three paths, one of them split in two, and said so on stderr
    assert "contains a newline" in lines.stderr and "use -0" in lines.stderr
    refused = invoke("search", "a dog", "--index-dir", index_dir, "--json", "-0")
    assert refused.exit_code == 2 and "give one of --json and --paths (or -0)" in refused.output
    assert "-0, --null" in invoke("search", "--help").output


def test_the_api_expands_the_home_folder_in_every_path(bundle, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # a `~` taken literally would be a folder named "~" here
    shutil.copytree(bundle, tmp_path / "model")
    make_photos(tmp_path / "photos")
    (tmp_path / "titles.jsonl").write_text("".join(
        json.dumps({"image": f"photos/{name}", "caption": f"photo {name}"}) + "\n" for name in ("a.png", "b.png")))

    index = mm.build_index("~/photos", model="~/model", index_dir="~/idx", runtime="torch", device="cpu",
                           captions="~/titles.jsonl", workers=0, progress=False)
    assert index.folder == tmp_path / "idx" and len(index) == 3
    assert index.reader.embedder.ref == str(tmp_path / "model")
    reopened = mm.open_index("~/idx", model="~/model", runtime="torch", device="cpu")
    assert reopened.search_image("~/photos/a.png", k=1)[0].path == str(tmp_path / "photos" / "a.png")
    assert reopened.remove(["~/photos/b.png"]) == 1 and len(reopened) == 2
    report = mm.build_text_index("~/titles.jsonl", model="~/model", index_dir="~/texts", runtime="torch",
                                 device="cpu", progress=False)
    assert report.total == 2 and (tmp_path / "texts" / "manifest.json").is_file()
    assert not (tmp_path.parent / "~").exists()


def test_a_model_given_by_a_relative_path_is_found_from_another_folder(bundle, tmp_path, monkeypatch):
    import shutil

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(bundle, project / "runs" / "frozen" / "best")
    make_photos(project / "photos")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    embedder = load_embedder("runs/frozen/best", "torch", "cpu")
    assert embedder.ref == embedder.path == str(project / "runs" / "frozen" / "best")
    built = invoke("index", "photos", "--model", "runs/frozen/best", "--index-dir", tmp_path / "idx",
                   "--workers", 0, "--runtime", "torch", "--device", "cpu")
    assert built.exit_code == 0, built.output
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["model"]["ref"] == embedder.ref

    monkeypatch.chdir(elsewhere)
    found = invoke("search", "a dog", "--index-dir", tmp_path / "idx", "--runtime", "torch", "--device", "cpu",
                   "--paths")
    assert found.exit_code == 0, found.output
    assert str(project / "photos" / "a.png") in found.stdout.splitlines()


@pytest.mark.onnx
@pytest.mark.slow
def test_info_on_an_int8_export_shows_its_own_agreement_and_recall_gate(bundle, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from mmretrieve.export import exporter

    def fake_recall(folder, items, progress=False):  # the tiny model's real recall is near chance
        r5 = {"fp32": 80.0}.get(folder.name, 77.5)
        return {direction: {"R@1": 50.0, "R@5": r5, "R@10": 90.0, "median_rank": 2.0} for direction in ("t2i", "i2t")}

    monkeypatch.setattr(exporter, "recall_report", fake_recall)
    colours = make_colour_dataset(tmp_path / "colours", per_colour=1)
    manifest = exporter.export_model(str(bundle), tmp_path / "int8", precision="int8", eval_data=colours, force=True)

    shown = invoke("info", tmp_path / "int8")
    assert shown.exit_code == 0, shown.output
    text_cosine = manifest["agreement"]["text"]["min_cosine"]
    assert f"int8 vs PyTorch min cosine {text_cosine:.4f}" in shown.stdout
    assert "recall R@5:   fp32: t2i 80.00, i2t 80.00; int8: t2i 77.50, i2t 77.50" in shown.stdout
    assert ("recall gate:  FAILED, written with --force (int8 loses 2.50 points of t2i R@5; at most 1.0 allowed "
            "on each of R@1, R@5, R@10)") in shown.stdout

    checks = json.loads(invoke("info", tmp_path / "int8", "--json").stdout)["checks"]
    assert checks["precision"] == "int8" and checks["agreement"]["image"]["min_cosine"] == \
        manifest["agreement"]["image"]["min_cosine"]
    assert checks["recall"]["drop"] == {"t2i": 2.5, "i2t": 2.5} and checks["recall"]["passed"] is False
    assert checks["recall"]["drops"]["i2t"] == {"R@1": 0.0, "R@5": 2.5, "R@10": 0.0}

    # The same export as if written with --force and no --eval-data: says the recall was not checked.
    export_json = tmp_path / "int8" / "export.json"
    export_json.write_text(json.dumps({k: v for k, v in manifest.items() if k != "recall"}))
    unchecked = invoke("info", tmp_path / "int8")
    assert "recall:       not checked; this int8 export was written with --force and no --eval-data" in unchecked.stdout
    assert json.loads(invoke("info", tmp_path / "int8", "--json").stdout)["checks"]["recall"] is None


def test_docs_and_code_cite_no_paths_of_the_machine_they_were_written_on():
    import re

    root = Path(__file__).resolve().parents[1]
    machine_path = re.compile(r"(?<![\w.~-])/(?:work|root|home/\w+|Users/\w+)/")
    suffixes = {".md", ".py", ".toml", ".txt", ".json", ".yml", ".yaml", ".js", ".html", ".cfg", ".ini"}
    places = [root / "README.md", *(root / name for name in ("docs", "benchmarks", "plugins", "mmretrieve", "index",
                                                             "deploy", "tools", "tests"))]
    hits = []
    for place in places:
        files = [place] if place.is_file() else sorted(place.rglob("*")) if place.is_dir() else []
        for file in files:
            if file.is_file() and (file.suffix in suffixes or file.name.startswith("Dockerfile")) \
                    and file != Path(__file__).resolve() and ".venv" not in file.parts:
                text = file.read_text(errors="replace")
                hits += [f"{file.relative_to(root)}: {m.group(0)}" for m in machine_path.finditer(text)]
    assert not hits, hits
