"""Model bundles: exact round trip, manifest, refusal of newer formats, corruption, atomicity."""

import json

import numpy as np
import pytest

from conftest import random_image
from mmretrieve.bundle import FORMAT_VERSION, load_bundle, read_bundle_info, save_bundle
from mmretrieve.errors import BundleError

TEXTS = ["a black cat on a keyboard", "two dogs running on the beach"]


def test_round_trip_gives_identical_embeddings(tiny_model, tmp_path):
    images = [random_image(1), random_image(2, (50, 120))]
    before_t, before_i = tiny_model.embed("text", TEXTS), tiny_model.embed("image", images)
    save_bundle(tiny_model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    np.testing.assert_array_equal(loaded.embed("text", TEXTS), before_t)
    np.testing.assert_array_equal(loaded.embed("image", images), before_i)
    assert loaded.logit_scale.item() == pytest.approx(tiny_model.logit_scale.item())


def test_bundle_layout_and_manifest(tiny_model, tmp_path):
    info = save_bundle(tiny_model, tmp_path / "bundle", metadata={"note": "test"})
    files = {p.relative_to(tmp_path / "bundle").as_posix() for p in (tmp_path / "bundle").rglob("*") if p.is_file()}
    assert files == {"manifest.json", "model.json", "weights.safetensors", "text/config.json",
                     "text/tokenizer.json", "text/text_preprocess.json", "image/image_preprocess.json"}
    manifest = info.manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["mmretrieve_version"]
    assert len(manifest["fingerprint"]) == 32 and manifest["embed_dim"] == 16
    assert manifest["metadata"] == {"note": "test"}
    assert not list(tmp_path.glob(".bundle.*")), "no staging folder left behind"


def test_fingerprint_tracks_the_weights(tiny_model, tmp_path):
    import torch

    first = save_bundle(tiny_model, tmp_path / "a").fingerprint
    assert save_bundle(tiny_model, tmp_path / "b").fingerprint == first
    with torch.no_grad():
        tiny_model.text_head.weight.add_(0.01)
    assert save_bundle(tiny_model, tmp_path / "c").fingerprint != first


def test_newer_format_is_refused_with_what_to_do(tiny_model, tmp_path):
    save_bundle(tiny_model, tmp_path / "bundle")
    manifest_path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer than this mmretrieve.*pip install -U mmretrieve"):
        load_bundle(tmp_path / "bundle")


def test_corrupt_weights_are_detected(tiny_model, tmp_path):
    save_bundle(tiny_model, tmp_path / "bundle")
    weights = tmp_path / "bundle" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors does not match its recorded hash"):
        load_bundle(tmp_path / "bundle")


def test_missing_file_is_detected(tiny_model, tmp_path):
    save_bundle(tiny_model, tmp_path / "bundle")
    (tmp_path / "bundle" / "text" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        read_bundle_info(tmp_path / "bundle", verify=True)


def test_interrupted_save_keeps_the_previous_bundle(tiny_model, tmp_path, monkeypatch):
    import safetensors.torch

    first = save_bundle(tiny_model, tmp_path / "bundle").fingerprint

    def dies_half_way(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(tiny_model, tmp_path / "bundle")
    assert read_bundle_info(tmp_path / "bundle", verify=True).fingerprint == first
    assert not list(tmp_path.glob(".bundle.*"))


def test_not_a_bundle_and_missing_paths(tmp_path):
    with pytest.raises(BundleError, match="is not a model bundle"):
        read_bundle_info(tmp_path)
    with pytest.raises(BundleError, match="no model folder at"):
        read_bundle_info(tmp_path / "missing")


@pytest.fixture
def own_bert(tmp_path):
    """A tiny BERT in a folder this test may overwrite, standing in for a wheel's weights."""
    from tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path / "wheel-bert")


def reference_model(bert_dir):
    import torch

    from mmretrieve.config import ModelConfig, TowerConfig
    from mmretrieve.model import build_model
    from tiny_models import TINY_TIMM

    torch.manual_seed(0)
    return build_model(ModelConfig(text=TowerConfig("bert", {"model_name": str(bert_dir), "max_length": 32}),
                                   image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 64}),
                                   embed_dim=16))


def test_reference_tower_stores_only_what_training_changed(own_bert, tmp_path):
    import torch
    from safetensors import safe_open

    model = reference_model(own_bert)
    changed = "text_tower.model.encoder.layer.1.output.dense.bias"
    with torch.no_grad():
        model.state_dict()[changed].add_(0.5)  # as if the top layer had been fine-tuned
    before = model.embed("text", TEXTS)
    info = save_bundle(model, tmp_path / "bundle", reference_towers=("text",))

    with safe_open(str(tmp_path / "bundle" / "weights.safetensors"), "pt") as stored:
        text_keys = [k for k in stored.keys() if k.startswith("text_tower.")]
    assert text_keys == [changed]
    assert info.model["towers"]["text"]["reference"]["changed_tensors"] == 1
    assert info.manifest["stored_parameters"] < info.manifest["parameters"]
    loaded = load_bundle(tmp_path / "bundle")
    np.testing.assert_array_equal(loaded.embed("text", TEXTS), before)
    np.testing.assert_array_equal(loaded.embed("image", [random_image(3)]), model.embed("image", [random_image(3)]))


def test_reference_tower_with_other_weights_is_refused(own_bert, tmp_path):
    from tiny_models import make_tiny_bert

    save_bundle(reference_model(own_bert), tmp_path / "bundle", reference_towers=("text",))
    make_tiny_bert(own_bert, seed=1)  # the "wheel" now holds differently initialised weights
    with pytest.raises(BundleError, match="other weights than the text tower"):
        load_bundle(tmp_path / "bundle")


def test_reference_tower_needs_its_encoder(own_bert, tmp_path):
    save_bundle(reference_model(own_bert), tmp_path / "bundle", reference_towers=("text",))
    model_json = tmp_path / "bundle" / "model.json"
    described = json.loads(model_json.read_text())
    described["towers"]["text"]["reference"]["encoder"] = "not-installed-encoder"
    model_json.write_text(json.dumps(described))
    with pytest.raises(BundleError, match="not-installed-encoder.*no installed plugin provides"):
        load_bundle(tmp_path / "bundle", verify=False)


def test_reference_and_embedded_bundles_have_different_fingerprints(own_bert, tmp_path):
    model = reference_model(own_bert)
    embedded = save_bundle(model, tmp_path / "embedded")
    referenced = save_bundle(model, tmp_path / "referenced", reference_towers=("text",))
    assert embedded.fingerprint != referenced.fingerprint
    assert save_bundle(model, tmp_path / "again", reference_towers=("text",)).fingerprint == referenced.fingerprint


# -- which model a name or a path means: bundle.resolve_model_ref, the one place that decides ------
def test_a_model_ref_is_resolved_in_one_place(tmp_path, monkeypatch):
    import plugin_fixtures
    from mmretrieve.bundle import resolve_model_ref
    from mmretrieve.plugins import get_host

    get_host().register(plugin_fixtures.EveryHook(), "every-hook")  # registers the model `fake-model`
    model = tmp_path / "runs" / "best"
    model.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_ref("runs/best") == str(model.resolve())  # a path: absolute
    assert resolve_model_ref("fake-model") == "fake-model"  # a registered name stays a name
    # An index's record: the registered name, else the recorded folder, else the one beside the index.
    assert resolve_model_ref(built_with={"ref": "fake-model", "path": "/elsewhere"}) == "fake-model"
    assert resolve_model_ref(built_with={"ref": str(model), "path": str(model)}) == str(model)
    moved = {"ref": "/gone/runs/best", "path": "/gone/runs/best", "relative_path": "../runs/best"}
    assert resolve_model_ref(built_with=moved, index_dir=tmp_path / "idx") == str(model.resolve())
    # A model the user names wins over the index's record.
    assert resolve_model_ref("fake-model", built_with=moved, index_dir=tmp_path / "idx") == "fake-model"


def test_no_model_named_and_no_default_is_one_sentence(monkeypatch):
    from mmretrieve import plugins
    from mmretrieve.bundle import default_model, resolve_model_ref
    from mmretrieve.errors import InputError

    monkeypatch.setenv(plugins.ENV_BLOCK, "offline-towers")
    plugins.reset_host()
    assert default_model() is None
    with pytest.raises(InputError, match=r"^no model was named and no plugin provides a `default` model: give "
                                         r"--model MODEL \(or pip install mmretrieve-offline-towers\)$"):
        resolve_model_ref()


def test_the_cli_and_api_resolve_models_through_the_bundle_module_only():
    """cli.py imports no private helper of another module (it used index.search._model_location),
    and no module but bundle.py asks the model registry which names exist."""
    import ast
    import pathlib

    import mmretrieve

    root = pathlib.Path(mmretrieve.__file__).parent
    tree = ast.parse((root / "cli.py").read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == []
    asking = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                    if 'registry("model")' in path.read_text())
    assert asking == ["bundle.py"]
