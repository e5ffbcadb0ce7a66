"""`mmretrieve search --image q.jpg --text "at night" --fusion NAME --weights ...` on a tiny real index."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mmretrieve.bundle import save_bundle
from mmretrieve.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def cli_index(messy_image_folder, tmp_path, tiny_model, monkeypatch):
    bundle = save_bundle(tiny_model, tmp_path / "bundle").path
    monkeypatch.setenv("MMRETRIEVE_INDEX_ROOT", str(tmp_path / "indexes"))
    result = CliRunner().invoke(cli, ["index", str(messy_image_folder), "--model", str(bundle), "--workers", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return messy_image_folder


def search(*args):
    result = CliRunner().invoke(cli, ["search", "-k", "4", "--json", *args])
    assert result.exit_code == 0, result.output
    return [(hit["path"], round(hit["score"], 4)) for hit in json.loads(result.stdout)]


def test_weights_at_the_ends_reproduce_single_modality_search(cli_index):
    image = str(cli_index / "a.jpg")
    by_image = search("--image", image)
    by_text = search("at night")
    for fusion in ("late", "mean"):
        assert search("--image", image, "--text", "at night", "--fusion", fusion, "--weights", "0,1") == by_image
        assert search("--image", image, "--text", "at night", "--fusion", fusion, "--weights", "1,0") == by_text
    # Late fusion scores every image by the weighted sum of its similarities (weights are text,image; -k 50: all).
    image_scores = dict(search("--image", image, "-k", "50"))
    text_scores = dict(search("at night", "-k", "50"))
    mixed = search("--image", image, "--text", "at night", "--fusion", "late", "--weights", "1,3", "-k", "50")
    assert len(mixed) == len(image_scores) > 1
    for path, score in mixed:
        assert score == pytest.approx(0.25 * text_scores[path] + 0.75 * image_scores[path], abs=2e-4)

@pytest.mark.parametrize("args, message", [
    (["--text", "at night", "--fusion", "mean", "--weights", "-1,2"], "must not be negative"),
    (["--text", "at night", "--fusion", "late", "--weights", "0,0"], "all zero"),
    (["--text", "at night", "--fusion", "gated"], "has no gated head"),
    (["--text", "at night", "--fusion", "meen"], "meen"),
])
def test_fusion_mistakes_are_one_line(cli_index, args, message):
    result = CliRunner().invoke(cli, ["search", "--image", str(cli_index / "a.jpg"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["a cat", "--fusion", "mean"], ["--text", "at night"], ["a cat", "--text", "x"]])
def test_fusion_options_need_one_image_and_a_text(args):
    result = CliRunner().invoke(cli, ["search", *args])
    assert result.exit_code == 2 and ("--text" in result.output)
