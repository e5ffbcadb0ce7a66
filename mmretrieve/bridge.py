"""The label bridge: an image tower's classifier turned into a zero-shot vector in the text tower's space.

ConSE (Norouzi et al., 2014, "Zero-Shot Learning by Convex Combination of Semantic Embeddings"):
an image's class probabilities (softmax of the classifier's logits over a temperature, the
top-T classes renormalised) weight the text tower's embeddings of the class names (each the
mean of normalised embeddings of prompt templates filled with the class's names). The result
lives in the text tower's own space, so a raw text-tower query embedding searches it: the
image tower's ImageNet knowledge (cats, espresso, wall clocks) reaches queries that the
projection heads, trained on a few thousand captioned photos, never saw.

The bridge is a constant module (nothing in it trains): ``classifier`` (the image tower's
linear head) and ``class_embeddings`` (classes x text dim) are stored with the model, so a
bundle, its ONNX export and every runtime compute it without the class names or the hub.
RetrievalModel (mmretrieve/model.py) combines it with the heads' space.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import BridgeConfig
from .errors import ConfigError


class LabelBridge(nn.Module):
    """Image-tower features -> L2-normalised ConSE vectors in the text tower's space."""

    def __init__(self, in_dim: int, num_classes: int, text_dim: int, top_t: int, temperature: float):
        super().__init__()
        if num_classes < 1:
            raise ConfigError("model.bridge.num_classes must be at least 1 (set when the bridge is built)")
        if not 1 <= top_t <= num_classes:
            raise ConfigError(f"model.bridge.top_t must be between 1 and {num_classes}, not {top_t}")
        if not temperature > 0:
            raise ConfigError(f"model.bridge.temperature must be above 0, not {temperature}")
        self.classifier = nn.Linear(in_dim, num_classes)
        self.register_buffer("class_embeddings", torch.zeros(num_classes, text_dim))
        self.top_t = int(top_t)
        self.temperature = float(temperature)
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(features.float()) / self.temperature
        if self.top_t < logits.shape[-1]:
            # softmax over the top-T logits = the top-T probabilities renormalised
            top, index = logits.topk(self.top_t, dim=-1)
            vectors = (top.softmax(dim=-1).unsqueeze(-1) * self.class_embeddings[index]).sum(dim=1)
        else:
            vectors = logits.softmax(dim=-1) @ self.class_embeddings
        return nn.functional.normalize(vectors, dim=-1)


def class_names(config: BridgeConfig) -> list[list[str]]:
    """Per class, its names (the first ``config.synonyms`` lemmas of its description)."""
    if config.classes != "imagenet-1k":
        raise ConfigError(f"model.bridge.classes must be imagenet-1k (the class list timm ships), not {config.classes!r}")
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    names = []
    for index in range(info.num_classes()):
        lemmas = [part.strip() for part in info.index_to_description(index).split(",") if part.strip()]
        names.append(lemmas[:max(1, config.synonyms)])
    return names


def prompts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every name, names outer."""
    return [template.format(name) for name in names for template in templates]


def class_embeddings(text_encoder, names: list[list[str]], templates: Sequence[str], batch_size: int = 256,
                     device: Any = None, progress: bool = True) -> np.ndarray:
    """(classes, text dim): per class, the normalised mean of its normalised prompt embeddings."""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError("model.bridge.templates must be a non-empty list of strings with {} where the class name goes")
    texts, owners = [], []
    for index, lemmas in enumerate(names):
        filled = prompts(lemmas, templates)
        texts += filled
        owners += [index] * len(filled)
    vectors = text_encoder.embed(texts, batch_size=batch_size, normalize=True, device=device, progress=progress)
    sums = np.zeros((len(names), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(owners), vectors)
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return sums.astype(np.float32)


def load_classifier(reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of an image tower's classifier from a ``"module:function"`` reference;
    the function returns them as tensors (or an nn.Linear)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"model.bridge.classifier must be \"module:function\", not {reference!r}")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.bridge.classifier {reference!r} cannot be loaded: {exc}") from None
    result = function()
    if isinstance(result, nn.Linear):
        return result.weight.detach(), result.bias.detach() if result.bias is not None else None
    weight, bias = result
    return torch.as_tensor(weight), (torch.as_tensor(bias) if bias is not None else None)


def build_bridge(config: BridgeConfig, image_dim: int, text_dim: int) -> LabelBridge:
    """An empty bridge of the configured shape (weights are loaded or filled in after)."""
    return LabelBridge(image_dim, config.num_classes, text_dim, config.top_t, config.temperature)


def fill_bridge(bridge: LabelBridge, config: BridgeConfig, text_encoder, weight: torch.Tensor,
                bias: torch.Tensor | None, device: Any = None, progress: bool = True) -> None:
    """Copy the classifier into ``bridge`` and embed the class names with ``text_encoder``."""
    if tuple(weight.shape) != tuple(bridge.classifier.weight.shape):
        raise ConfigError(f"model.bridge.classifier {config.classifier!r} gives a {tuple(weight.shape)} weight, but the "
                          f"bridge expects {tuple(bridge.classifier.weight.shape)} (classes x image tower dim)")
    names = class_names(config)
    if len(names) != weight.shape[0]:
        raise ConfigError(f"model.bridge.classes has {len(names)} classes, the classifier {weight.shape[0]}")
    with torch.no_grad():
        bridge.classifier.weight.copy_(weight)
        bridge.classifier.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
        matrix = class_embeddings(text_encoder, names, config.templates, device=device, progress=progress)
        bridge.class_embeddings.copy_(torch.from_numpy(matrix))
