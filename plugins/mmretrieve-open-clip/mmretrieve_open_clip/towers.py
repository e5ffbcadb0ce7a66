"""open_clip's text and image towers as mmretrieve encoders, their projections split off.

An open_clip model is built once (``load_model``) and taken apart: the text tower
(``model.text``: open_clip's ``TextTransformer`` or an ``HFTextEncoder``) and the image tower
(``model.visual``: ``VisionTransformer``, a timm trunk, ``ModifiedResNet``) each become an
encoder whose ``forward`` gives the pooled features *before* the projection into the shared
space. The projection becomes the RetrievalModel's linear head:

- ``TextTransformer.text_projection``: a (width, embed_dim) Parameter used as ``x @ P``, so the
  head's weight is ``P.T``; a bias-free ``nn.Linear`` gives its weight as it is;
- ``VisionTransformer.proj``: the same (``pooled @ proj``);
- ``HFTextEncoder.proj`` and a timm trunk's ``head.proj``: a bias-free ``nn.Linear``.

A projection with a bias (SigLIP's text tower), an MLP (xlm-roberta pairs), or one built into the
network (ModifiedResNet's attention pool, MobileCLIP's timm classifier) stays inside the tower,
and the head is the identity.

Models are always built with open_clip's ``CustomTextCLIP`` layout (``force_custom_text``), so the
text tower is one module; open_clip converts CLIP-layout checkpoints when it loads them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmretrieve.encoders.base import Encoder
from mmretrieve.errors import InputError
from mmretrieve.preprocess import ImagePreprocessor, load_preprocessor

from .naming import HF_HUB, LOCAL_DIR, split_model_name
from .preprocessing import image_config, text_preprocessor

CONFIG_FILE = "open_clip_config.json"  # open_clip's own name for {"model_cfg", "preprocess_cfg"}
HF_TEXT_DIR = "hf_text"  # an HF text tower's config.json, inside a bundle's text folder


# -- building open_clip models ------------------------------------------------------------------

def _from_cache_first(load, what: str):
    """``load()`` with the Hub cache only; when that fails, from the Hub if it answers, else one
    sentence on working offline (open_clip reports a failed download as a RuntimeError)."""
    from mmretrieve.encoders.hub import cache_only, hub_reachable

    try:
        with cache_only():
            return load()
    except (OSError, ValueError, RuntimeError):
        if not hub_reachable():
            raise InputError(f"{what} is not in the local cache and the model hub cannot be reached (or "
                             f"HF_HUB_OFFLINE is set); give a checkpoint file (open-clip:ARCH:/path/to/checkpoint) "
                             f"or folder (open-clip:local-dir:PATH), or download it once with network access") from None
    return load()


def model_config(model_name: str) -> dict[str, Any]:
    """open_clip's model config for a built-in name, ``local-dir:PATH`` or ``hf-hub:ORG/REPO``."""
    from open_clip.factory import get_model_config

    try:
        config = _from_cache_first(lambda: get_model_config(model_name), f"the open_clip config of {model_name}") \
            if model_name.startswith(HF_HUB) else get_model_config(model_name)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read the open_clip config of {model_name!r}: {str(exc).splitlines()[0]}") from None
    if config is None:
        raise InputError(f"{model_name!r} is not an open_clip model; `mmretrieve open-clip-models` lists them "
                         f"(or give hf-hub:ORG/REPO or local-dir:PATH)")
    return copy.deepcopy(config)


def _refuse_unsupported(model_cfg: dict[str, Any], name: str) -> None:
    if "multimodal_cfg" in model_cfg:
        raise InputError(f"{name} is a CoCa captioning model; the open-clip plugin builds contrastive pairs only")


def build_random(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None,
                 hf_text_dir: str | Path | None = None, name: str = "the open_clip model") -> nn.Module:
    """The architecture of ``model_cfg`` with random weights, offline: no tower fetches pretrained
    weights, and an HF text tower reads its config.json from ``hf_text_dir`` when given."""
    from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    _refuse_unsupported(model_cfg, name)
    config = copy.deepcopy(model_cfg)
    config.pop("custom_text", None)
    text_cfg, vision_cfg = config.setdefault("text_cfg", {}), config.setdefault("vision_cfg", {})
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_pretrained"] = False
        if hf_text_dir is not None:
            text_cfg["hf_model_name"] = str(hf_text_dir)
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False
    try:
        model = CustomTextCLIP(**config)
    except OSError as exc:  # an HF text tower whose config cannot be fetched
        raise InputError(f"cannot build {name}: {str(exc).splitlines()[0]}") from None
    preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg or {})
    preprocess["size"] = getattr(model.visual, "image_size", preprocess["size"])
    set_model_preprocess_cfg(model, preprocess)
    return model.eval()


def load_model(model_name: str, weights: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(open_clip model with pretrained weights, its model config). ``weights``: a pretrained tag
    of ``model_name`` or a checkpoint file; ``local-dir:`` and ``hf-hub:`` names carry their own.
    Tags and Hub repositories come from the local cache first, from the Hub only when it answers."""
    import open_clip

    has_schema = model_name.startswith((LOCAL_DIR, HF_HUB))
    is_file = bool(weights) and os.path.isfile(weights)
    config = model_config(model_name)
    _refuse_unsupported(config, model_name)
    if not has_schema and not is_file:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if weights and (os.path.sep in weights or Path(weights).suffix):
            raise InputError(f"no checkpoint file at {weights}")
        if not weights or weights not in tags:
            what = f"no pretrained {weights!r}" if weights else "no weights named"
            raise InputError(f"{what} for open_clip's {model_name}: write open-clip:{model_name}:TAG (its tags: "
                             f"{', '.join(tags) or 'none'}) or open-clip:{model_name}:/path/to/checkpoint")

    def create():
        return open_clip.create_model(model_name, pretrained=weights, force_custom_text=True,
                                      pretrained_text=False, pretrained_image=False)

    try:
        if model_name.startswith(LOCAL_DIR) or is_file:
            model = create()
        else:
            model = _from_cache_first(create, f"open_clip's {model_name}" + (f" ({weights})" if weights else ""))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load open_clip's {model_name}" + (f" from {weights}" if weights else "") +
                         f": {str(exc).splitlines()[0]}") from None
    return model.eval(), config


# -- the towers ---------------------------------------------------------------------------------

def _linear_weight(projection) -> torch.Tensor | None:
    """The (out, in) weight of a bias-free linear map given as open_clip stores it, else None."""
    if isinstance(projection, nn.Parameter) or (isinstance(projection, torch.Tensor) and projection.ndim == 2):
        return projection.detach().T.contiguous().clone()  # used as x @ P
    if type(projection) is nn.Linear and projection.bias is None:
        return projection.weight.detach().contiguous().clone()
    return None


@contextlib.contextmanager
def _exportable():
    """While ONNX export traces a tower: nn.MultiheadAttention without its fused inference kernel
    (``aten::_native_multi_head_attention``, which has no ONNX form); the same arithmetic."""
    if not torch.onnx.is_in_onnx_export():
        yield
        return
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class OpenClipTextTower(nn.Module):
    """(input_ids, attention_mask) -> pooled text features, computed as open_clip does.

    Positions outside ``attention_mask`` get the padding id, and a ``TextTransformer`` sees its
    full context (padded with that id), as open_clip's tokenizer gives it: models with
    bidirectional attention (MobileCLIP, SigLIP) attend to padding, so only the full length
    computes their features.
    """

    def __init__(self, text: nn.Module, pad_id: int, context_length: int | None):
        super().__init__()
        self.text = text
        self.pad_id = int(pad_id)
        self.context_length = context_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.masked_fill(attention_mask == 0, self.pad_id)
        if self.context_length:
            padding = torch.full((1, self.context_length), self.pad_id, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, padding.expand(ids.shape[0], -1)], dim=1)[:, :self.context_length]
        with _exportable():
            return self.text(ids)


class OpenClipImageTower(nn.Module):
    """pixel_values -> pooled image features (open_clip's ``visual``, projection split off)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with _exportable():
            return self.visual(pixel_values)


def split_text_projection(text: nn.Module) -> torch.Tensor | None:
    """Take the bias-free projection out of an open_clip text tower (it then returns pooled
    features); None when the tower keeps its projection."""
    if hasattr(text, "text_projection"):  # TextTransformer
        weight = _linear_weight(text.text_projection)
        if weight is not None:
            text.text_projection = None
        return weight
    proj = getattr(text, "proj", None)  # HFTextEncoder
    weight = _linear_weight(proj)
    if weight is not None:
        text.proj = nn.Identity()
    return weight


def split_image_projection(visual: nn.Module) -> torch.Tensor | None:
    proj = getattr(visual, "proj", None)  # VisionTransformer (ModifiedResNet has none: its pool projects)
    if isinstance(proj, torch.Tensor):
        weight = _linear_weight(proj)
        visual.proj = None
        return weight
    head = getattr(visual, "head", None)  # open_clip's TimmModel
    if isinstance(head, nn.Sequential) and hasattr(visual, "trunk") and isinstance(getattr(head, "proj", None), nn.Linear):
        weight = _linear_weight(head.proj)
        if weight is not None:
            head.proj = nn.Identity()
        return weight
    return None


def _output_dim(module: nn.Module, example: dict[str, np.ndarray]) -> int:
    with torch.no_grad():
        return int(module(**{k: torch.from_numpy(v) for k, v in example.items()}).shape[-1])


# Where the blocks of each kind of tower are, by parameter name (the first that matches is used).
BLOCK_PATTERNS = (
    r"\.transformer\.resblocks\.(\d+)\.",  # open_clip TextTransformer / VisionTransformer
    r"\.transformer\.encoder\.layer\.(\d+)\.",  # HF text towers (BERT, RoBERTa, XLM-R)
    r"\.trunk\.blocks\.(\d+)\.", r"\.trunk\.stages\.(\d+)\.", r"\.trunk\.layers\.(\d+)\.",  # timm trunks
    r"\.layer(\d+)\.",  # ModifiedResNet
)


def group_by_blocks(names: list[str]) -> list[list[str]]:
    """Parameter names grouped input side first: what comes before the first block, each block,
    then the rest (final norm, pooling, any projection kept in the tower)."""
    for pattern in BLOCK_PATTERNS:
        found = [(name, re.search(pattern, name)) for name in names]
        if not any(match for _, match in found):
            continue
        blocks: dict[int, list[str]] = {}
        before, after = [], []
        for name, match in found:
            if match:
                blocks.setdefault(int(match.group(1)), []).append(name)
            else:
                (after if blocks else before).append(name)
        return [g for g in [before, *[blocks[i] for i in sorted(blocks)], after] if g]
    return [names]


class _OpenClipEncoder(Encoder):
    """What both towers share: how they are built, saved and rebuilt."""

    def __init__(self, model_name: str, weights: str | None = None, pretrained: bool = True):
        """model_name: an open_clip architecture (``ViT-B-32``), optionally with ``:TAG`` or
        ``:/path/to/checkpoint`` appended, or ``hf-hub:ORG/REPO`` / ``local-dir:PATH``;
        weights: the pretrained tag or checkpoint file (when not in model_name);
        pretrained=False: the architecture with random weights."""
        model_name, named_weights = split_model_name(model_name)
        weights = weights or named_weights
        if pretrained:
            model, config = load_model(model_name, weights)
        else:
            config = model_config(model_name)
            model = build_random(config, name=model_name)
        self._setup(model, config, {"model_name": model_name, "weights": weights})

    @classmethod
    def from_open_clip(cls, model: nn.Module, config: dict[str, Any], options: dict[str, Any], preprocessor=None):
        """This tower of an open_clip model already built (a pair builds the model once). The
        tower's modules are taken from ``model``, which should not be used afterwards.
        ``preprocessor``: a saved one, instead of building it from the model's config."""
        encoder = cls.__new__(cls)
        encoder._setup(model, config, dict(options), preprocessor)
        return encoder

    def _setup(self, model: nn.Module, config: dict[str, Any], options: dict[str, Any], preprocessor=None) -> None:
        raise NotImplementedError

    def enable_grad_checkpointing(self) -> None:
        tower = self._tower()
        if hasattr(tower, "transformer") and hasattr(tower.transformer, "config"):  # an HF text tower
            hf = tower.transformer
            (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
        else:
            tower.set_grad_checkpointing(True)

    def _tower(self) -> nn.Module:
        raise NotImplementedError

    def layer_groups(self) -> list[list[str]]:
        return group_by_blocks([name for name, _ in self.module.named_parameters()])

    def _save_config(self, folder: Path) -> None:
        document = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(document, indent=2))

    def save_architecture(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        self._save_config(folder)
        self.preprocessor.save(folder)
        return dict(self.options)

    @classmethod
    def from_bundle(cls, folder: Path, options: dict[str, Any]) -> "_OpenClipEncoder":
        """The architecture from the open_clip_config.json saved in the tower folder (random
        weights: the bundle's replace them), without the hub."""
        folder = Path(folder)
        document = json.loads((folder / CONFIG_FILE).read_text())
        hf_dir = folder / HF_TEXT_DIR
        model = build_random(document["model_cfg"], document.get("preprocess_cfg"),
                             hf_text_dir=hf_dir if hf_dir.is_dir() else None, name=str(folder))
        return cls.from_open_clip(model, document["model_cfg"], {k: options.get(k) for k in ("model_name", "weights")},
                                  load_preprocessor(folder))


class OpenClipTextEncoder(_OpenClipEncoder):
    family = "open-clip-text"
    modality = "text"
    input_names = ("input_ids", "attention_mask")
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}

    def _setup(self, model: nn.Module, config: dict[str, Any], options: dict[str, Any], preprocessor=None) -> None:
        text = model.text
        self.projection = split_text_projection(text)
        self.model_cfg = config
        self.preprocess_cfg = {}
        self.options = options
        if preprocessor is None:
            # open_clip reads a local-dir model's HF tokenizer from that folder, not from the hub.
            name = str(options.get("model_name") or "")
            source = name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else None
            preprocessor = text_preprocessor(config, tokenizer_source=source)
        pad_id = preprocessor.tokenizer.padding["pad_id"]
        is_hf = hasattr(text, "transformer") and hasattr(text, "config")
        # HF towers mask padding themselves; open_clip's TextTransformer sees its whole context.
        context = None if is_hf else int(getattr(text, "num_pos", None) or text.context_length)
        if not is_hf and getattr(text, "cls_emb", None) is not None:
            raise InputError("open_clip text towers with a class token (CoCa) are not supported")
        module = OpenClipTextTower(text, pad_id, context).eval()
        self.lora_targets = ("query", "key", "value") if is_hf else ("c_fc", "c_proj")
        Encoder.__init__(self, module, preprocessor, 0)
        self.dim = _output_dim(module, self.example_inputs())

    def _tower(self) -> nn.Module:
        return self.module.text

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        return self.preprocess(["an example caption"] * (batch - 1) + ["a longer example caption with more words"])

    def save_architecture(self, folder: Path) -> dict[str, Any]:
        options = super().save_architecture(folder)
        config = getattr(self.module.text, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):  # HF text tower: its config.json
            config.save_pretrained(Path(folder) / HF_TEXT_DIR)
        return options


class OpenClipImageEncoder(_OpenClipEncoder):
    family = "open-clip-image"
    modality = "image"
    input_names = ("pixel_values",)
    dynamic_axes = {"pixel_values": {0: "batch"}}

    def _setup(self, model: nn.Module, config: dict[str, Any], options: dict[str, Any], preprocessor=None) -> None:
        from open_clip.model import get_model_preprocess_cfg

        visual = model.visual
        self.preprocess_cfg = json.loads(json.dumps(get_model_preprocess_cfg(model)))
        self.projection = split_image_projection(visual)
        self.model_cfg = config
        self.options = options
        module = OpenClipImageTower(visual).eval()
        self.lora_targets = ("qkv", "fc1", "fc2") if hasattr(visual, "trunk") else ("c_fc", "c_proj")
        Encoder.__init__(self, module, preprocessor or ImagePreprocessor(image_config(self.preprocess_cfg)), 0)
        self.dim = _output_dim(module, self.example_inputs(batch=1))

    def _tower(self) -> nn.Module:
        return self.module.visual

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        size = self.preprocessor.config.size
        return {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
