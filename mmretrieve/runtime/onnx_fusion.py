"""A fusion bundle's ``fusion.onnx`` run by onnxruntime: trained heads without PyTorch.

``OnnxEmbedder.load_fusion_head`` builds one with the embedder's own sessions, so the head runs
on the providers the towers run on. Inputs ``text`` and ``image`` (n, d) float32, output
``fused`` (n, d), normalised (written by ``mmretrieve.fusion.onnx.export_fusion_onnx``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError
from ..fusion.store import ONNX_GRAPH, check_base_model, read_fusion_info
from ..fusion.strategies import FusionStrategy, check_pair
from .ort import import_onnxruntime


class OnnxFusion(FusionStrategy):
    """A fusion bundle's ``fusion.onnx`` behind the strategy interface: fusing without torch."""

    trainable = True

    def __init__(self, folder: str | Path, base_fingerprint: str | None = None, create_session=None):
        folder = Path(folder)
        description = read_fusion_info(folder)
        check_base_model(folder, description, base_fingerprint)
        if not (folder / ONNX_GRAPH).is_file():
            raise BundleError(f"{folder} has no {ONNX_GRAPH}; re-save it with `mmretrieve train-fusion`")
        self.name = description["strategy"]
        self.dim = int(description["dim"])
        self.digest = description.get("head_digest")
        self.base_fingerprint = description["base_model_fingerprint"]
        if create_session is None:  # plain CPU when no embedder's sessions are given
            onnxruntime = import_onnxruntime()
            create_session = lambda path: onnxruntime.InferenceSession(  # noqa: E731
                str(path), providers=["CPUExecutionProvider"])
        self.session = create_session(folder / ONNX_GRAPH)

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        text, image = check_pair(text, image)
        if text.shape[1] != self.dim:
            raise InputError(f"{self.name} head fuses {self.dim}-d embeddings, got {text.shape[1]}-d")
        (fused,) = self.session.run(["fused"], {"text": text, "image": image})
        return fused.astype(np.float32, copy=False)
