"""The torch runtime: a model bundle in PyTorch, on CUDA when present.

Each tower is built on first use (``bundle.load_tower``), so a text search never builds the
image network (2.9 s of ``from_pretrained`` for the default model's two towers). Threads follow
the process's thread policy (mmretrieve.threads) and glibc's allocator is tuned first
(``tune_allocator``: the image tower otherwise spends most of its time in page faults). Each
batch normalisation that follows a convolution is folded into it when the image tower is built
(``fold_batch_norms``): at inference it is a fixed scale and shift, and it took 22% of the
default image tower's time as a pass of its own.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from ..allocator import tune_allocator
from ..bundle import load_bundle, load_tower, read_bundle_info
from ..encoders.base import auto_device
from ..preprocess import load_preprocessor
from ..threads import apply_to_torch


log = logging.getLogger(__name__)

TEXT_SUB_BATCH = 16  # texts per forward once a batch is sorted by length
# What folding may change: float rounding only (measured 4e-7 on the default image tower).
FOLD_TOLERANCE = 1e-4
# Batch norms whose forward is a batch norm followed by what ``_after_norm`` keeps: timm's
# BatchNormAct2d (its dropout and activation).
NORM_WITH_ACTIVATION = ("BatchNormAct2d",)


def _after_norm(norm: nn.Module) -> nn.Module:
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(norm.drop, norm.act)


@torch.inference_mode(False)
def fold_batch_norms(network: nn.Module, example: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """A copy of ``network`` (in eval mode) with each batch norm that alone reads a convolution's
    output folded into that convolution's weights and bias; returns ``(network, folds)``.

    Which norm reads which convolution is seen by running ``example`` once with hooks, so any
    architecture is handled; a convolution run twice, or whose output anything else reads as
    well, is left alone, and the folded copy must give the original's outputs on ``example`` (its
    inputs by name; else the original is returned, unchanged)."""
    if not any(isinstance(module, nn.BatchNorm2d) for module in network.modules()):
        return network, 0
    folded = copy.deepcopy(network).eval()
    names = {module: name for name, module in folded.named_modules()}
    made_by: dict[int, nn.Module] = {}  # id of a convolution's output -> that convolution
    outputs, runs, readers = [], {}, {}

    def after_conv(module, inputs, output):
        runs[module] = runs.get(module, 0) + 1
        made_by[id(output)] = module
        outputs.append(output)  # kept alive so no later tensor reuses its id

    def before(module, inputs):
        if isinstance(module, nn.BatchNorm2d):
            runs[module] = runs.get(module, 0) + 1
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor) and id(tensor) in made_by:
                readers.setdefault(id(tensor), []).append(module)

    hooks = []
    for module in folded.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        if isinstance(module, nn.BatchNorm2d) or not any(True for _ in module.children()):
            hooks.append(module.register_forward_pre_hook(before))
    with torch.no_grad():
        try:
            reference = network.eval()(**example)
            folded(**example)
        finally:
            for hook in hooks:
                hook.remove()
    pairs = [(made_by[key], users[0]) for key, users in readers.items()
             if len(users) == 1 and runs[made_by[key]] == 1 and isinstance(users[0], nn.BatchNorm2d)
             and runs[users[0]] == 1
             and (type(users[0]) is nn.BatchNorm2d or type(users[0]).__name__ in NORM_WITH_ACTIVATION)
             and users[0].track_running_stats and users[0].running_mean is not None]
    outputs.clear()
    if not pairs:
        return network, 0

    def replace(module: nn.Module, new: nn.Module) -> None:
        parent, _, attribute = names[module].rpartition(".")
        setattr(folded.get_submodule(parent), attribute, new)

    for conv, norm in pairs:
        replace(conv, nn.utils.fusion.fuse_conv_bn_eval(conv, norm))
        replace(norm, _after_norm(norm))
    with torch.no_grad():
        difference = (folded(**example) - reference).abs().max().item()
    if difference > FOLD_TOLERANCE:
        log.debug("batch norms not folded: the folded network differs by %.3g", difference)
        return network, 0
    return folded, len(pairs)


class TorchEmbedder:
    def __init__(self, model_ref: str, device: str | None = None, fold_norms: bool = True):
        """fold_norms: fold the image tower's batch norms into its convolutions (``fold_batch_norms``)."""
        tune_allocator()
        apply_to_torch()
        self.ref = str(model_ref)
        self.runtime = "torch"
        self.info = read_bundle_info(model_ref, verify=True)  # every file re-hashed once, here
        self.device = auto_device(device or None)  # "cuda" pinned: batches run on another thread
        self.fingerprint = self.info.fingerprint
        self.embed_dim = int(self.info.manifest["embed_dim"])  # with a label bridge, wider than config.embed_dim
        # The preprocessing saved with the bundle, as load_bundle gives its towers.
        self.image_preprocessor = load_preprocessor(self.info.path / "image")
        self.text_preprocessor = load_preprocessor(self.info.path / "text")
        self.path = str(self.info.path)
        self._towers: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._model = None
        self.fold_norms = fold_norms

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
            network = encoder.module.to(self.device).eval()
            size = getattr(getattr(self.image_preprocessor, "config", None), "size", None)
            if name == "image" and self.fold_norms and size:
                example = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(0))
                network, _ = fold_batch_norms(network, {"pixel_values": example.to(self.device)})
            self._towers[name] = (network, head.to(self.device).eval())
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
