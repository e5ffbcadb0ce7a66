"""`timm`: any timm architecture as an image tower, preprocessing from its own data config."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..preprocess import ImagePreprocessConfig, ImagePreprocessor
from .base import Encoder
from .hub import load_from_hub

log = logging.getLogger(__name__)


class ImageTower(nn.Module):
    """A timm model without its classifier: pixel_values -> (batch, num_features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        # Convolutions run ~1.6x faster on CPU in channels-last layout (measured on
        # EfficientNet-Lite0); the conversion is free when the input is already in it.
        return self.model(pixel_values.contiguous(memory_format=torch.channels_last))


# timm modules that pad TensorFlow-style ("same") through padding.pad_same: Conv2dSame, the
# pools and StdConv2dSame look the function up in their own module when they run.
PAD_SAME_USERS = ("timm.layers.conv2d_same", "timm.layers.pool2d_same", "timm.layers.std_conv")


@contextlib.contextmanager
def fixed_size_padding():
    """timm's "same" padding computed from the input's height and width as plain numbers while a
    tower is traced: the graph's image size is fixed (only the batch axis is dynamic), so each Pad
    gets constant pads, which onnxruntime folds into the next Conv. Traced as it is, the padding is
    computed from the tensor's shape at run time (Shape, Ceil, ...), and for EfficientNet-Lite0's
    five stride-2 convolutions onnxruntime left each Pad standing between layout reorders (NCHWc to
    NCHW and back): 20% of the image tower's time; 1.24x img/s without them (docs/benchmarks.md)."""
    try:
        from timm.layers.padding import get_same_padding
    except ImportError as exc:  # another timm layout: trace its padding as it is (slower, still right)
        log.debug("timm padding left as it is: %s", exc)
        yield
        return

    def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
        height, width = (int(size) for size in x.shape[-2:])  # int(): a constant in the trace
        pad_h = get_same_padding(height, kernel_size[0], stride[0], dilation[0])
        pad_w = get_same_padding(width, kernel_size[1], stride[1], dilation[1])
        return nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)

    modules = []
    for name in PAD_SAME_USERS:  # a module a timm version lacks or renamed keeps its own padding
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            log.debug("timm padding of %s left as it is: %s", name, exc)
            continue
        if hasattr(module, "pad_same"):
            modules.append(module)
    saved = [module.pad_same for module in modules]
    for module in modules:
        module.pad_same = pad_same
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.pad_same = original


class TimmEncoder(Encoder):
    family = "timm"
    modality = "image"
    input_names = ("pixel_values",)
    dynamic_axes = {"pixel_values": {0: "batch"}}

    def __init__(self, model_name: str, pretrained: bool = True, weights: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, image_size: int | None = None):
        """pretrained: timm's weights (hub); weights: a local checkpoint file instead of the hub."""
        import timm

        model_kwargs = dict(model_kwargs or {})
        weights = os.path.expanduser(str(weights)) if weights else None  # ~/w.pth, as a shell would
        if weights and not Path(weights).is_file():
            raise InputError(f"cannot build timm model {model_name!r}: no weights file {weights}")
        overlay = {**model_kwargs.pop("pretrained_cfg_overlay", {}), **({"file": str(weights)} if weights else {})} or None

        def create() -> nn.Module:
            return timm.create_model(model_name, pretrained=bool(pretrained or weights), num_classes=0,
                                     pretrained_cfg_overlay=overlay, **model_kwargs)

        try:
            # Hub weights: the cache first, the hub only if it answers (its retries take ~30 s).
            model = load_from_hub(create, f"timm's pretrained {model_name!r} weights") \
                if pretrained and not weights else create()
        except (OSError, RuntimeError) as exc:  # RuntimeError: "Unknown model"
            raise InputError(f"cannot build timm model {model_name!r}: {str(exc).splitlines()[0]}") from None
        data_config = timm.data.resolve_data_config({}, model=model)
        preprocess = ImagePreprocessConfig.from_timm(data_config)
        if image_size:
            preprocess.size = int(image_size)
        self.options = {"model_name": model_name, "model_kwargs": model_kwargs, "image_size": preprocess.size}
        # With num_classes=0 some models (MobileNetV3, ...) still apply a hidden pre-logits layer.
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        model.to(memory_format=torch.channels_last)
        super().__init__(ImageTower(model), ImagePreprocessor(preprocess), dim)

    lora_targets = ("qkv", "query", "key", "value")

    def layer_groups(self) -> list[list[str]]:
        from timm.models import group_parameters

        model = self.module.model
        grouped = group_parameters(model, model.group_matcher(coarse=False))
        return [[f"model.{n}" for n in names] for _, names in sorted(grouped.items(), key=lambda kv: kv[0])]

    def enable_grad_checkpointing(self) -> None:
        self.module.model.set_grad_checkpointing(True)

    def export_context(self) -> contextlib.AbstractContextManager:
        return fixed_size_padding()

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        size = self.preprocessor.config.size
        return {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}

    def save_architecture(self, folder: Path) -> dict[str, Any]:
        self.preprocessor.save(Path(folder))
        return dict(self.options)

