"""The torch runtime: a model bundle in PyTorch, on CUDA when present."""

from __future__ import annotations

import numpy as np
import torch

from ..bundle import load_bundle, resolve_model
from ..encoders.base import auto_device


TEXT_SUB_BATCH = 16  # texts per forward once a batch is sorted by length


class TorchEmbedder:
    def __init__(self, model_ref: str, device: str | None = None):
        self.ref = str(model_ref)
        self.runtime = "torch"
        self.model = load_bundle(model_ref)
        self.device = torch.device(device) if device else auto_device()
        self.model.to(self.device).eval()
        self.fingerprint = self.model.bundle.fingerprint
        self.embed_dim = self.model.embed_dim
        self.image_preprocessor = self.model.image_encoder.preprocessor
        self.text_preprocessor = self.model.text_encoder.preprocessor
        self.path = str(resolve_model(model_ref))

    def load_fusion_head(self, folder):
        """The trained fusion head in ``folder`` (a fusion bundle) in PyTorch; a head trained on another
        model is refused."""
        from ..fusion.store import load_fusion

        return load_fusion(folder, base_fingerprint=self.fingerprint)

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(pixels).to(self.device)
        return self.model.encode_image({"pixel_values": tensor}).float().cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from . import embed_by_length

        feeds = self.text_preprocessor(texts)
        if len(texts) <= TEXT_SUB_BATCH:
            return self._encode_texts(feeds)
        return embed_by_length(feeds, self._encode_texts, self.embed_dim, TEXT_SUB_BATCH)  # as the onnx runtime

    def _encode_texts(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
        return self.model.encode_text(inputs).float().cpu().numpy()

    def embed_images(self, images: list) -> np.ndarray:
        return self.embed_pixels(self.image_preprocessor(images)["pixel_values"])
