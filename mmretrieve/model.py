"""The two-tower retrieval model: encoders, projection heads, learnable temperature."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
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

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def temperature_scale(self) -> torch.Tensor:
        """1/T, clamped as CLIP does so the logits cannot blow up."""
        return self.logit_scale.float().exp().clamp(max=self.config.max_logit_scale)

    def encode_text(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        features = self.text_head(self.text_tower(**inputs))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_image(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        features = self.image_head(self.image_tower(**inputs))
        return nn.functional.normalize(features, dim=-1) if normalize else features

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


def build_model(config: ModelConfig) -> RetrievalModel:
    """A fresh model: towers from their registered encoders, heads randomly initialised."""
    from .encoders import create_encoder

    text = create_encoder(config.text.encoder, **config.text.options)
    image = create_encoder(config.image.encoder, **config.image.options)
    return RetrievalModel(config, text, image)
