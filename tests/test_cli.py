"""Every command through click's CliRunner, plus start-up cost in a real subprocess."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import plugin_fixtures
from conftest import BAD_IMAGES, GOOD_IMAGES
from mmretrieve import __version__, plugins
from mmretrieve.bundle import save_bundle
from mmretrieve.cli import cli
from tiny_models import TINY_TIMM


@pytest.fixture
def builtins_only(monkeypatch):
    monkeypatch.setenv(plugins.ENV_LOAD, "")


def test_version(run):
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_plugins_table_and_json(run, builtins_only):
    table = run("plugins")
    assert table.exit_code == 0
    assert "mmretrieve.default_plugins.encoders" in table.output and "encoders: bert, timm, hf-pair-text, hf-pair-image" in table.output
    listed = json.loads(run("plugins", "--json").output)
    builtin = next(p for p in listed if p["name"] == "mmretrieve.default_plugins.encoders")
    assert builtin["encoders"] == ["bert", "timm", "hf-pair-text", "hf-pair-image"] and builtin["source"] == "builtin" and builtin["version"] == __version__


def test_plugins_shows_a_skipped_plugin(run, builtins_only):
    plugins.get_host().register(plugin_fixtures.RaisesInHook(), "raiser")
    result = run("plugins")
    assert result.exit_code == 0 and "raiser" in result.output and "SKIPPED" in result.output and "boom" in result.output


def test_plugin_commands_are_added(builtins_only):
    from mmretrieve.cli import _add_plugin_commands

    plugins.get_host().register(plugin_fixtures.EveryHook(), "every-hook")
    _add_plugin_commands()
    try:
        result = CliRunner().invoke(cli, ["fake-hello", "world"])
        assert result.exit_code == 0 and result.output == "hello world\n"
    finally:
        cli.commands.pop("fake-hello", None)


def test_embed_texts_with_an_encoder(run, tiny_bert_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog on the beach\n\na cat on a sofa\n")
    out = tmp_path / "emb.npy"
    result = run("embed", "--encoder", "bert", "--set", f"model_name={tiny_bert_dir}", "--text", "a black cat",
                 "--texts-file", texts, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"text: 3 x 32 float32 -> {out}" in result.output
    matrix = np.load(out)
    assert matrix.shape == (3, 32) and matrix.dtype == np.float32
    rows = json.loads((tmp_path / "emb.rows.json").read_text())
    assert [r["input"] for r in rows] == ["a black cat", "a dog on the beach", "a cat on a sofa"]


def test_embed_image_folder_skips_bad_files_and_writes_csv(run, messy_image_folder, tmp_path):
    out = tmp_path / "img.npy"
    result = run("embed", "--encoder", f"timm:{TINY_TIMM}", "--set", "pretrained=false", "--set", "image_size=64",
                 "--image", messy_image_folder, "-o", out, "--rows-format", "csv", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["outputs"][0]["rows"] == len(GOOD_IMAGES)
    assert {s["path"].rsplit("/", 1)[-1] for s in summary["skipped"]} == BAD_IMAGES
    with open(tmp_path / "img.rows.csv", newline="") as handle:
        names = {row["input"].rsplit("/", 1)[-1] for row in csv.DictReader(handle)}
    assert names == GOOD_IMAGES
    assert np.load(out).shape[0] == len(GOOD_IMAGES)


def test_embed_with_a_model_bundle_writes_both_modalities(run, tiny_model, messy_image_folder, tmp_path):
    save_bundle(tiny_model, tmp_path / "bundle")
    result = run("embed", "--model", tmp_path / "bundle", "--text", "a cat", "--image",
                 messy_image_folder / "a.jpg", "-o", tmp_path / "both.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "both.text.npy").shape == (1, 16)
    assert np.load(tmp_path / "both.image.npy").shape == (1, 16)


def test_embed_reads_encoder_options_from_a_config_file(run, tiny_bert_dir, tmp_path):
    from mmretrieve.encoders import create_encoder

    config = tmp_path / "enc.yaml"
    config.write_text(f"model_name: {tiny_bert_dir}\npooling: cls\n")
    texts = ["a red cat", "two dogs on the beach"]
    result = run("embed", "--encoder", "bert", "--config", config, "--text", texts[0], "--text", texts[1],
                 "-o", tmp_path / "e.npy")
    assert result.exit_code == 0, result.output
    assert "text: 2 x 32 float32" in result.output  # the tiny BERT's width, not bert-base-uncased's 768
    rows = np.load(tmp_path / "e.npy")
    cls = create_encoder("bert", model_name=str(tiny_bert_dir), pooling="cls").embed(texts)
    mean = create_encoder("bert", model_name=str(tiny_bert_dir), pooling="mean").embed(texts)
    np.testing.assert_allclose(rows, cls, atol=1e-5)  # `pooling: cls` from the file took effect
    assert np.abs(rows - mean).max() > 1e-2  # ...and the default (mean) would have been told apart


@pytest.mark.parametrize("args, message", [
    (["--text", "x"], "give exactly one of --encoder NAME or --model MODEL"),
    (["--encoder", "bret", "--text", "x"], "unknown encoder 'bret'; did you mean 'bert'?"),
    (["--encoder", "timm", "--text", "x"], "encoder 'timm' embeds images only"),
    (["--encoder", "bert"], "nothing to embed"),
    (["--model", "no/such/bundle", "--text", "x"], "no model folder at no/such/bundle"),
    (["--encoder", "bert", "--set", "oops", "--text", "x"], "--set expects key=value"),
])
def test_embed_mistakes_are_one_sentence(run, builtins_only, args, message):
    result = run("embed", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_embed_empty_folder_and_all_bad_images(run, tmp_path, messy_image_folder):
    (tmp_path / "empty").mkdir()
    result = run("embed", "--encoder", "timm", "--image", tmp_path / "empty")
    assert result.exit_code != 0 and "holds no image files" in result.output
    result = run("embed", "--encoder", f"timm:{TINY_TIMM}", "--set", "pretrained=false",
                 "--image", messy_image_folder / "zero.jpg", "--image", messy_image_folder / "corrupt.png")
    assert result.exit_code != 0 and "none of the 2 images could be read" in result.output


def test_info_describes_a_bundle(run, tiny_model, tmp_path):
    info = save_bundle(tiny_model, tmp_path / "bundle")
    result = run("info", tmp_path / "bundle", "--verify")
    assert result.exit_code == 0
    assert info.fingerprint in result.output and "embed dim:    16" in result.output
    assert "text tower:   bert (bert, 32-d)" in result.output and "files match their hashes" in result.output
    as_json = json.loads(run("info", tmp_path / "bundle", "--json").output)
    assert as_json["manifest"]["fingerprint"] == info.fingerprint


def test_info_on_a_folder_that_is_no_bundle(run, tmp_path):
    result = run("info", tmp_path)
    assert result.exit_code != 0 and "is not a model bundle" in result.output


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["embed", "--help"]])
def test_startup_never_imports_torch(args):
    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm', 'faiss', 'onnxruntime', 'ray') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    # mmretrieve and the plugin shipped with it; a third-party plugin installed here may import what it likes
    env = {**os.environ, plugins.ENV_LOAD: "offline-towers"}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env)
    assert "HEAVY []" in result.stderr, result.stderr


def test_info_prints_what_a_partial_training_record_has(bundle, run):
    """A bundle whose training record was edited by hand (a gain without i2t) is described, not a KeyError."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"] = {"step": 7, "start": {"t2i": {"R@1": 10.0}}, "val": {"t2i": {"R@1": 12.0}},
                            "gain": {"t2i": {"R@1": 2.0}}}
    manifest_path.write_text(json.dumps(manifest))
    result = run("info", str(bundle))
    assert result.exit_code == 0, result.output
    assert "best at step 7: mean recall 10.0 at the start -> 12.0 (gain R@1/R@5: t2i +2.0/?, i2t ?/?)" in result.output
