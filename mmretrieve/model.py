"""The two-tower retrieval model: encoders, projection heads, learnable temperature.

With a label bridge (``config.bridge.enabled``, mmretrieve/bridge.py) an embedding has two
parts: the heads' space and the text tower's own space, where the bridge places images by
their class probabilities. Images are ``[sqrt(w) * head(image), sqrt(1-w) * bridge(image)]``
and texts ``[sqrt(w) * head(text), sqrt(1-w) * text tower(text)]``, each part L2-normalised,
so one inner product is ``w`` times the heads' cosine plus ``1-w`` times the bridge's, the
whole vector has norm 1, and every index, export, runtime and fusion works on it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .bridge import LabelBridge, build_bridge
from .config import BridgeConfig, ModelConfig
from .embedding import embed_batched
from .encoders.base import Encoder
from .errors import ConfigError

HEADS = ("linear", "mlp")


def make_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        head = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(head.weight, std=in_dim ** -0.5)
        return head
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    raise ConfigError(f"head must be one of {HEADS}, not {kind!r}")


class RetrievalModel(nn.Module):
    """Text and image towers projected into one normalised space."""

    def __init__(self, config: ModelConfig, text_encoder: Encoder, image_encoder: Encoder):
        super().__init__()
        if text_encoder.modality != "text" or image_encoder.modality != "image":
            raise ConfigError(
                f"the text tower must be a text encoder and the image tower an image encoder "
                f"(got {text_encoder.modality} and {image_encoder.modality})"
            )
        self.config = config
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.text_tower = text_encoder.module
        self.image_tower = image_encoder.module
        self.text_head = make_head(config.head, text_encoder.dim, config.embed_dim)
        self.image_head = make_head(config.head, image_encoder.dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.bridge = build_bridge(config.bridge, image_encoder.dim, text_encoder.dim) \
            if config.bridge.enabled else None
        check_bridge_weight(config.bridge.weight)

    @property
    def embed_dim(self) -> int:
        """The embedding's width: the heads' space, plus the text tower's width with a bridge."""
        return self.config.embed_dim + (self.bridge.dim if self.bridge is not None else 0)

    def project(self, modality: str, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """A tower's raw features -> the model's embedding (what encode_text / encode_image return)."""
        head = self.text_head if modality == "text" else self.image_head
        return combine(head(features), self.config, modality, features, self.bridge, normalize)

    def temperature_scale(self) -> torch.Tensor:
        """1/T, clamped as CLIP does so the logits cannot blow up."""
        return self.logit_scale.float().exp().clamp(max=self.config.max_logit_scale)

    def projection(self, modality: str) -> nn.Module:
        """``project(modality, .)`` as a module, for code that maps cached tower features."""
        return _Projection(self, modality)

    def encode_text(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        return self.project("text", self.text_tower(**inputs), normalize)

    def encode_image(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        return self.project("image", self.image_tower(**inputs), normalize)

    def encode(self, modality: str, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        return self.encode_text(inputs, normalize) if modality == "text" else self.encode_image(inputs, normalize)

    def preprocess(self, modality: str, items: Sequence[Any]) -> dict[str, np.ndarray]:
        encoder = self.text_encoder if modality == "text" else self.image_encoder
        return encoder.preprocess(items)

    def embed(self, modality: str, items: Sequence[Any], batch_size: int = 32,
              device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
        """Normalised float32 embeddings in the shared space for texts or images."""
        return embed_batched(items, lambda batch: self.preprocess(modality, batch),
                             lambda inputs: self.encode(modality, inputs), self, self.embed_dim, modality,
                             batch_size, device, progress)


def check_bridge_weight(weight: float) -> None:
    if not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"model.bridge.weight must be between 0 and 1, not {weight}")


def combine(head_out: torch.Tensor, config: ModelConfig, modality: str, features: torch.Tensor,
            bridge: LabelBridge | None = None, normalize: bool = True) -> torch.Tensor:
    """The heads' output, and with a bridge its part beside it (see the module docstring)."""
    if not config.bridge.enabled:
        return nn.functional.normalize(head_out, dim=-1) if normalize else head_out
    weight = config.bridge.weight
    # Text: the tower's own (normalised) feature is the query the bridge's image vectors answer.
    second = bridge(features) if modality == "image" else nn.functional.normalize(features.float(), dim=-1)
    first = nn.functional.normalize(head_out.float(), dim=-1)
    return torch.cat([first * math.sqrt(weight), second * math.sqrt(1.0 - weight)], dim=-1)


class _Projection(nn.Module):
    def __init__(self, model: RetrievalModel, modality: str):
        super().__init__()
        self.model = model
        self.modality = modality

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.project(self.modality, features)


class TowerProjection(nn.Module):
    """One tower's features -> the model's embedding, without the other tower (the torch runtime's
    ``load_tower``); its parameters have the model's names (``text_head.weight``, ``bridge.*``)."""

    def __init__(self, config: ModelConfig, modality: str, tower_dim: int, text_dim: int):
        super().__init__()
        self.config = config
        self.modality = modality
        setattr(self, f"{modality}_head", make_head(config.head, tower_dim, config.embed_dim))
        self.bridge = build_bridge(config.bridge, tower_dim, text_dim) \
            if config.bridge.enabled and modality == "image" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        head = getattr(self, f"{self.modality}_head")
        return combine(head(features), self.config, self.modality, features, self.bridge)


def add_bridge(model: RetrievalModel, bridge: BridgeConfig, device: str | torch.device | None = None,
               progress: bool = True) -> RetrievalModel:
    """Give a model (a trained bundle's, say) a label bridge in place: the classifier loaded and the
    class names embedded by the model's own text tower; its heads are kept as they are."""
    from .bridge import fill_bridge, load_classifier

    if not bridge.classifier:
        raise ConfigError("a label bridge needs model.bridge.classifier: the \"module:function\" that returns the "
                          "image tower's classifier")
    weight, bias = load_classifier(bridge.classifier)
    settings = dataclasses.replace(bridge, enabled=True, num_classes=int(weight.shape[0]))
    check_bridge_weight(settings.weight)
    model.config = dataclasses.replace(model.config, bridge=settings)
    model.bridge = build_bridge(settings, model.image_encoder.dim, model.text_encoder.dim)
    fill_bridge(model.bridge, settings, model.text_encoder, weight, bias, device=device, progress=progress)
    return model


def build_model(config: ModelConfig, device: str | torch.device | None = None, progress: bool = True) -> RetrievalModel:
    """A fresh model: towers from their registered encoders, heads randomly initialised, and with
    ``config.bridge.enabled`` the label bridge filled (classifier loaded, class names embedded)."""
    from .bridge import fill_bridge, load_classifier
    from .encoders import create_encoder

    text = create_encoder(config.text.encoder, **config.text.options)
    image = create_encoder(config.image.encoder, **config.image.options)
    if not config.bridge.enabled:
        return RetrievalModel(config, text, image)
    if not config.bridge.classifier:
        raise ConfigError("model.bridge.enabled needs model.bridge.classifier: the \"module:function\" that returns "
                          "the image tower's classifier (e.g. mmretrieve_offline_towers.towers:efficientnet_lite0_classifier)")
    weight, bias = load_classifier(config.bridge.classifier)
    config.bridge.num_classes = int(weight.shape[0])
    model = RetrievalModel(config, text, image)
    fill_bridge(model.bridge, config.bridge, text, weight, bias, device=device, progress=progress)
    return model
