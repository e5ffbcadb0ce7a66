"""The ONNX image graph of a TensorFlow-padded ("same") timm tower, as the default model's
EfficientNet-Lite0 is: its padding is constant for the graph's fixed image size, so onnxruntime
folds each Pad into its convolution (a Pad left standing cost 20% of that tower's time), and the
graph still embeds exactly as PyTorch does at any batch size."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from tiny_models import TINY_TIMM

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.onnx, pytest.mark.slow]

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from mmretrieve.bundle import save_bundle  # noqa: E402
from mmretrieve.config import ModelConfig, TowerConfig  # noqa: E402
from mmretrieve.export.exporter import export_model  # noqa: E402
from mmretrieve.metrics import PARITY_MIN_COSINE  # noqa: E402
from mmretrieve.model import build_model  # noqa: E402
from mmretrieve.runtime.onnx_runtime import OnnxEmbedder  # noqa: E402
from mmretrieve.runtime.torch_runtime import TorchEmbedder  # noqa: E402


@pytest.fixture(scope="module")
def same_padded(tiny_bert_dir, tmp_path_factory):
    config = ModelConfig(
        text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 32}),
        image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 64,
                                                "model_kwargs": {"pad_type": "same"}}),
        embed_dim=16)
    torch.manual_seed(0)
    model = build_model(config)
    assert any(type(m).__name__ == "Conv2dSame" for m in model.image_encoder.module.modules())
    bundle = save_bundle(model, tmp_path_factory.mktemp("same") / "bundle").path
    export_model(str(bundle), bundle.parent / "export")
    return bundle, bundle.parent / "export"


def test_onnxruntime_folds_every_pad_into_its_convolution(same_padded, tmp_path):
    _, export = same_padded
    graph = onnx.load(str(export / "image.onnx")).graph
    assert "Pad" in {node.op_type for node in graph.node}  # the stride-2 convolutions pad unevenly
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(export / "image.onnx"), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx")).graph
    assert not [node.name for node in optimised.node if node.op_type in ("Pad", "Ceil")]


def test_the_fixed_padding_embeds_as_pytorch_at_any_batch(same_padded):
    import importlib

    from mmretrieve.encoders.timm_image import PAD_SAME_USERS

    bundle, export = same_padded
    # tracing swapped timm's padding function for a moment only
    padding = importlib.import_module("timm.layers.padding")
    assert all(importlib.import_module(name).pad_same is padding.pad_same for name in PAD_SAME_USERS)
    onnx_rows = OnnxEmbedder(export, device="cpu")
    torch_rows = TorchEmbedder(str(bundle), device="cpu")
    images = [random_image(seed, size) for seed, size in enumerate([(80, 60), (33, 90), (300, 40)])]
    for batch in ([images[0]], images):
        by_onnx, by_torch = onnx_rows.embed_images(batch), torch_rows.embed_images(batch)
        assert by_onnx.shape == (len(batch), onnx_rows.embed_dim)
        assert (by_onnx * by_torch).sum(axis=1).min() >= PARITY_MIN_COSINE
        assert np.abs(by_onnx - by_torch).max() < 1e-4


def test_a_timm_module_missing_or_without_pad_same_is_skipped_and_the_others_still_fixed(monkeypatch):
    # A timm release that drops or renames one of these modules must not fail every timm export.
    import importlib

    from mmretrieve.encoders import timm_image

    monkeypatch.setattr(timm_image, "PAD_SAME_USERS",
                        (*timm_image.PAD_SAME_USERS, "timm.layers.no_such_module", "json"))
    conv2d_same = importlib.import_module("timm.layers.conv2d_same")
    original = conv2d_same.pad_same
    torch.manual_seed(0)
    conv, x = conv2d_same.Conv2dSame(3, 4, 3, stride=2), torch.randn(1, 3, 9, 9)
    expected = conv(x)
    with timm_image.fixed_size_padding():
        assert conv2d_same.pad_same is not original
        torch.testing.assert_close(conv(x), expected)
    assert conv2d_same.pad_same is original and not hasattr(importlib.import_module("json"), "pad_same")
