"""The torch runtime: a model bundle in PyTorch, on CUDA when present.

Each tower is built on first use (``bundle.load_tower``), so a text search never builds the
image network (2.9 s of ``from_pretrained`` for the default model's two towers). Threads follow
the process's thread policy (mmretrieve.threads) and glibc's allocator is tuned first
(``tune_allocator``: the image tower otherwise spends most of its time in page faults).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..allocator import tune_allocator
from ..bundle import load_bundle, load_tower, read_bundle_info
from ..encoders.base import auto_device
from ..preprocess import load_preprocessor
from ..threads import apply_to_torch


TEXT_SUB_BATCH = 16  # texts per forward once a batch is sorted by length


class TorchEmbedder:
    def __init__(self, model_ref: str, device: str | None = None):
        tune_allocator()
        apply_to_torch()
        self.ref = str(model_ref)
        self.runtime = "torch"
        self.info = read_bundle_info(model_ref, verify=True)  # every file re-hashed once, here
        self.device = torch.device(device) if device else auto_device()
        self.fingerprint = self.info.fingerprint
        self.embed_dim = int(self.info.manifest["embed_dim"])  # with a label bridge, wider than config.embed_dim
        # The preprocessing saved with the bundle, as load_bundle gives its towers.
        self.image_preprocessor = load_preprocessor(self.info.path / "image")
        self.text_preprocessor = load_preprocessor(self.info.path / "text")
        self.path = str(self.info.path)
        self._towers: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._model = None

    @property
    def model(self):
        """The whole RetrievalModel (both towers), loaded on first use; embedding does not need it."""
        if self._model is None:
            self._model = load_bundle(self.path).to(self.device).eval()
        return self._model

    def tower(self, name: str) -> tuple[nn.Module, nn.Module]:
        """``(network, projection head)`` of the text or image tower, built on first use."""
        if name not in self._towers:
            encoder, head = load_tower(self.info, name)
            self._towers[name] = (encoder.module.to(self.device).eval(), head.to(self.device).eval())
        return self._towers[name]

    def load_fusion_head(self, folder):
        """The trained fusion head in ``folder`` (a fusion bundle) in PyTorch; a head trained on another
        model is refused."""
        from ..fusion.store import load_fusion

        return load_fusion(folder, base_fingerprint=self.fingerprint)

    def _encode(self, name: str, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        network, head = self.tower(name)  # what RetrievalModel.encode_text / encode_image compute
        return nn.functional.normalize(head(network(**inputs)), dim=-1).float().cpu().numpy()

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) from ``resize_crop``, normalised here by ``ImagePreprocessor.normalize``
        (the values an ONNX export's graph computes from the same bytes), or normalised float32."""
        pixels = np.asarray(pixels)
        if pixels.dtype == np.uint8:
            pixels = self.image_preprocessor.normalize(pixels)
        return self._encode("image", {"pixel_values": torch.from_numpy(pixels).to(self.device)})

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from . import embed_by_length

        feeds = self.text_preprocessor(texts)
        if len(texts) <= TEXT_SUB_BATCH:
            return self._encode_texts(feeds)
        return embed_by_length(feeds, self._encode_texts, self.embed_dim, TEXT_SUB_BATCH)  # as the onnx runtime

    def _encode_texts(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._encode("text", {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()})

    def embed_images(self, images: list) -> np.ndarray:
        return self.embed_pixels(self.image_preprocessor.uint8_batch(images))
