"""The one CPU end-to-end run the style guide asks for, through the CLI as a user types it:
train a tiny model a few steps -> export it to ONNX (parity gate) -> index photos with the onnx
runtime -> search by text, and the photo of the colour named ranks first."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmretrieve.cli import cli
from tiny_models import COLOURS, TINY_TIMM, make_colour_dataset

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

if importlib.util.find_spec("onnxruntime") is None:  # an optional extra (mmretrieve[cpu]); never on a load error
    pytest.skip("onnxruntime is not installed (pip install 'mmretrieve[cpu]')", allow_module_level=True)

# Colours far apart in RGB, so a tiny model learns them in a few steps.
QUERY_COLOURS = ("red", "green", "blue", "yellow", "white", "black")


def cli_ok(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_train_export_index_search(tmp_path, tiny_bert_dir):
    data = make_colour_dataset(tmp_path / "colours", per_colour=4, size=32)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "val_size": 7, "batch_size": 7, "warmup_steps": 2, "workers": 0, "head_lr": 0.05, "log_every": 1,
        "seed": 0,
        "model": {"embed_dim": 16,
                  "text": {"encoder": "bert", "options": {"model_name": str(tiny_bert_dir), "max_length": 16}},
                  "image": {"encoder": f"timm:{TINY_TIMM}", "options": {"pretrained": False, "image_size": 32}}},
    }))

    # train: heads on frozen towers (the default), 120 small steps on captioned near-solid colours;
    # every seed tried (0-4) ranks all six colours right, the smallest margin 0.09 in cosine
    trained = json.loads(cli_ok("train", "--config", config, "--data", data, "--epochs", 40,
                                "-o", tmp_path / "run", "--json"))
    assert trained["steps"] == 40 * 3  # 21 training images // 7 per batch
    bundle = tmp_path / "run" / "best"

    # export: fp32 ONNX, written only if it matches PyTorch (the parity gate)
    exported = json.loads(cli_ok("export", "--model", bundle, "--out", tmp_path / "export", "--json"))
    parity = exported["parity"]
    assert set(parity) == {"text", "image"} and all(r["min_cosine"] >= 0.9999 for r in parity.values()), parity

    # index: new photos, one per colour, embedded by onnxruntime from the export folder
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in QUERY_COLOURS:
        Image.new("RGB", (40, 30), COLOURS[colour]).save(photos / f"{colour}.png")
    report = json.loads(cli_ok("index", photos, "--model", tmp_path / "export", "--runtime", "onnx",
                               "--index-dir", tmp_path / "index", "--workers", 0, "--json"))
    assert report["total"] == len(QUERY_COLOURS)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["model"]["ref"] == str(tmp_path / "export")

    # search: each colour word finds its photo first, and onnx answers as the trained torch model does
    queries = [f"a {colour} dog" for colour in QUERY_COLOURS]
    by_onnx = json.loads(cli_ok("search", *queries, "--index-dir", tmp_path / "index", "--runtime", "onnx",
                                "-k", len(QUERY_COLOURS), "--json"))
    firsts = {hits["query"]: Path(hits["results"][0]["path"]).name for hits in by_onnx}
    assert firsts == {query: f"{colour}.png" for query, colour in zip(queries, QUERY_COLOURS)}

    by_torch = json.loads(cli_ok("search", *queries, "--index-dir", tmp_path / "index", "--model", bundle,
                                 "--runtime", "torch", "--device", "cpu", "-k", len(QUERY_COLOURS), "--json"))
    for onnx_hits, torch_hits in zip(by_onnx, by_torch):
        assert [h["path"] for h in onnx_hits["results"]] == [h["path"] for h in torch_hits["results"]]
        np.testing.assert_allclose([h["score"] for h in onnx_hits["results"]],
                                   [h["score"] for h in torch_hits["results"]], atol=1e-4)
