"""The label bridge (mmretrieve/bridge.py) and the two-part embedding it gives RetrievalModel."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mmretrieve.bridge import LabelBridge, class_names, prompts
from mmretrieve.config import BridgeConfig, ModelConfig, TowerConfig
from mmretrieve.errors import ConfigError
from tiny_models import TINY_TIMM
from conftest import random_image  # module level: a plugin's conftest.py may take the name later

TINY_TIMM_DIM = 256  # test_efficientnet's pooled features


def random_classifier():
    """A stand-in for an image tower's ImageNet classifier (1000 x 256), fixed by its seed."""
    generator = torch.Generator().manual_seed(7)
    return torch.randn(1000, TINY_TIMM_DIM, generator=generator), torch.randn(1000, generator=generator)


@pytest.fixture(scope="module")
def bridge_config(tiny_bert_dir) -> ModelConfig:
    return ModelConfig(
        text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 32}),
        image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 64}),
        embed_dim=16,
        bridge=BridgeConfig(enabled=True, classifier="test_bridge:random_classifier", templates=["a photo of a {}."],
                            top_t=5, temperature=0.5, weight=0.7),
    )


@pytest.fixture(scope="module")
def bridged(bridge_config):
    from mmretrieve.model import build_model

    torch.manual_seed(0)
    return build_model(dataclasses.replace(bridge_config, bridge=dataclasses.replace(bridge_config.bridge)),
                       progress=False).eval()


def test_bridge_weights_the_top_classes_embeddings_by_their_renormalised_probabilities():
    bridge = LabelBridge(in_dim=4, num_classes=6, text_dim=3, top_t=2, temperature=0.5)
    with torch.no_grad():
        bridge.classifier.weight.copy_(torch.randn(6, 4))
        bridge.classifier.bias.zero_()
        bridge.class_embeddings.copy_(torch.randn(6, 3))
    features = torch.randn(5, 4)
    logits = (features @ bridge.classifier.weight.T / 0.5).numpy()
    expected = []
    for row in logits:
        top = np.argsort(-row)[:2]
        probs = np.exp(row[top] - row[top].max())
        probs /= probs.sum()
        vector = probs @ bridge.class_embeddings.numpy()[top]
        expected.append(vector / np.linalg.norm(vector))
    np.testing.assert_allclose(bridge(features).numpy(), np.array(expected), atol=1e-5)
    # With every class kept it is the plain softmax average.
    every = LabelBridge(4, 6, 3, top_t=6, temperature=1.0)
    every.load_state_dict(bridge.state_dict())
    plain = torch.softmax(features @ bridge.classifier.weight.T, dim=-1) @ bridge.class_embeddings
    np.testing.assert_allclose(every(features).numpy(), torch.nn.functional.normalize(plain, dim=-1).numpy(), atol=1e-5)
    assert not any(p.requires_grad for p in bridge.parameters()), "the bridge is a constant, never trained"


def test_class_names_and_prompts_come_from_timms_imagenet_descriptions():
    names = class_names(BridgeConfig(synonyms=2))
    assert len(names) == 1000 and names[281] == ["tabby", "tabby cat"] and names[657] == ["missile"]
    assert prompts(["cat", "kitty"], ["a {}", "the {}."]) == ["a cat", "the cat.", "a kitty", "the kitty."]


@pytest.mark.slow  # builds the bridge: 1,000 class prompts through the tiny BERT
def test_model_embedding_is_the_weighted_sum_of_heads_and_bridge(bridged, tiny_bert_dir):

    assert bridged.embed_dim == 16 + 32  # heads' space + the tiny BERT's width
    texts = ["a black cat", "two dogs running on the beach"]
    images = [random_image(1), random_image(2)]
    t = torch.from_numpy(bridged.embed("text", texts))
    i = torch.from_numpy(bridged.embed("image", images))
    np.testing.assert_allclose(t.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(i.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    with torch.no_grad():
        text_features = bridged.text_tower(**{k: torch.from_numpy(v) for k, v in bridged.preprocess("text", texts).items()})
        image_features = bridged.image_tower(**{k: torch.from_numpy(v) for k, v in bridged.preprocess("image", images).items()})
        head_t = torch.nn.functional.normalize(bridged.text_head(text_features), dim=-1)
        head_i = torch.nn.functional.normalize(bridged.image_head(image_features), dim=-1)
        raw_t = torch.nn.functional.normalize(text_features, dim=-1)
        bridge_i = bridged.bridge(image_features)
    expected = 0.7 * head_t @ head_i.T + 0.3 * raw_t @ bridge_i.T
    np.testing.assert_allclose((t @ i.T).numpy(), expected.numpy(), atol=1e-5)
    # The bridge's classifier and class-name embeddings were filled in, not left at zero.
    weight, _ = random_classifier()
    assert torch.equal(bridged.bridge.classifier.weight, weight)
    assert bridged.bridge.class_embeddings.norm(dim=-1).min() > 0.99
    assert bridged.config.bridge.num_classes == 1000


@pytest.mark.slow  # builds the bridge: 1,000 class prompts through the tiny BERT
def test_a_bundle_keeps_the_bridge_and_every_runtime_path_computes_it(bridged, tmp_path):
    from mmretrieve.bundle import load_bundle, save_bundle
    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    info = save_bundle(bridged, tmp_path / "bundle")
    assert info.manifest["embed_dim"] == 48
    loaded = load_bundle(info.path).eval()
    assert torch.equal(loaded.bridge.class_embeddings, bridged.bridge.class_embeddings)
    texts, images = ["a red car", "a cat on a sofa"], [random_image(3), random_image(4)]
    embedder = TorchEmbedder(str(info.path), device="cpu")  # one tower at a time (bundle.load_tower)
    assert embedder.embed_dim == 48
    np.testing.assert_allclose(embedder.embed_texts(texts), bridged.embed("text", texts), atol=1e-5)
    np.testing.assert_allclose(embedder.embed_images(images), bridged.embed("image", images), atol=1e-5)
    np.testing.assert_allclose(loaded.embed("image", images), bridged.embed("image", images), atol=1e-6)
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    shown = CliRunner().invoke(cli, ["info", str(info.path)])
    assert shown.exit_code == 0, shown.output
    assert "embed dim:    48" in shown.output
    assert "label bridge: 1000 classes, top 5, temperature 0.5, weight 0.7 (heads 16-d + 32-d)" in shown.output


@pytest.mark.slow
@pytest.mark.onnx
def test_the_bridge_exports_to_onnx_inside_the_image_graph(bridged, tmp_path):
    from mmretrieve.bundle import save_bundle
    from mmretrieve.export.exporter import export_model
    from mmretrieve.runtime import load_embedder

    bundle = save_bundle(bridged, tmp_path / "bundle").path
    manifest = export_model(str(bundle), tmp_path / "onnx")  # refuses to write an export without parity
    assert manifest["embed_dim"] == 48 and set(manifest["parity"]) == {"text", "image"}
    onnx = load_embedder(str(tmp_path / "onnx"), "onnx")
    images = [random_image(5), random_image(6), random_image(7)]
    np.testing.assert_allclose(onnx.embed_images(images), bridged.embed("image", images), atol=1e-4)
    np.testing.assert_allclose(onnx.embed_texts(["a dog"]), bridged.embed("text", ["a dog"]), atol=1e-4)


def test_bridge_settings_are_checked(bridge_config):
    from mmretrieve.model import build_model

    with pytest.raises(ConfigError, match="model.bridge.weight must be between 0 and 1"):
        build_model(dataclasses.replace(bridge_config, bridge=dataclasses.replace(bridge_config.bridge, weight=1.5)),
                    progress=False)
    with pytest.raises(ConfigError, match="needs model.bridge.classifier"):
        build_model(dataclasses.replace(bridge_config, bridge=dataclasses.replace(bridge_config.bridge, classifier="")))
    with pytest.raises(ConfigError, match="cannot be loaded"):
        build_model(dataclasses.replace(bridge_config, bridge=dataclasses.replace(
            bridge_config.bridge, classifier="test_bridge:no_such_function")))
    with pytest.raises(ConfigError, match="top_t must be between 1 and 6"):
        LabelBridge(4, 6, 3, top_t=7, temperature=1.0)
    assert math.isclose(BridgeConfig().weight, 0.5)


@pytest.mark.slow
def test_heads_train_with_the_bridge_in_place_and_validation_picks_its_weight(bridge_config, tiny_bert_dir, tmp_path):
    from mmretrieve.bundle import load_bundle
    from mmretrieve.config import TrainConfig
    from mmretrieve.data import load_captions, split_by_image
    from mmretrieve.evaluate import evaluate_model
    from mmretrieve.metrics import mean_recall
    from mmretrieve.train.loop import run_training
    from tiny_models import make_colour_dataset

    data = make_colour_dataset(tmp_path / "colours", per_colour=4)
    model = dataclasses.replace(bridge_config, bridge=dataclasses.replace(bridge_config.bridge, weight=0.5),
                                image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 48}))
    config = TrainConfig(data=str(data), model=model, val_size=7, batch_size=7, epochs=3, warmup_steps=1, workers=0,
                         head_lr=0.01, output=str(tmp_path / "run"), bridge_weights=[0.2, 0.9])
    result = run_training(config)
    loaded = load_bundle(result.best_bundle)
    assert loaded.config.bridge.weight in (0.2, 0.9) and loaded.embed_dim == 48
    weight, _ = random_classifier()
    assert torch.equal(loaded.bridge.classifier.weight, weight), "the bridge does not train"
    _, val_items = split_by_image(load_captions(str(data)).items, 0.05, 0, 7)
    assert evaluate_model(loaded, val_items, progress=False) == result.best
    chosen = mean_recall(result.best)
    for other in (0.2, 0.9):
        loaded.config.bridge.weight = other
        assert mean_recall(evaluate_model(loaded, val_items, progress=False)) <= chosen
