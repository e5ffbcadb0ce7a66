"""transformers pairs: CLIP, SigLIP (and fixed-resolution SigLIP 2) and Chinese-CLIP checkpoints.

A checkpoint is a hub id or a folder that ``save_pretrained`` wrote (``local-dir:PATH``). It is
loaded once per process; its two towers become the registered encoders ``hf-pair-text`` and
``hf-pair-image`` (pooled, pre-projection features exactly as the checkpoint computes them), its
projections and temperature the model's heads (``mmretrieve.pairs.model_from_pair``), and its
processor config and tokenizer the project's torch-free preprocessing, so torch and onnxruntime
see the same inputs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TowerConfig
from ..encoders.base import Encoder
from ..encoders.bert import quiet_transformers
from ..encoders.hub import hub_reachable, offline_requested
from ..bundle import LOCAL_DIR
from ..errors import InputError
from ..formats import read_json_object
from ..preprocess import ImagePreprocessConfig, ImagePreprocessor, TextPreprocessConfig, TextPreprocessor
from . import PairParts, pair_bundle

# model_type -> (pair class, text class, vision class), names in transformers.
CLASSES = {
    "clip": ("CLIPModel", "CLIPTextModel", "CLIPVisionModel"),
    "siglip": ("SiglipModel", "SiglipTextModel", "SiglipVisionModel"),
    "chinese_clip": ("ChineseCLIPModel", "ChineseCLIPTextModel", "ChineseCLIPVisionModel"),
}
# The model prefixes (mmretrieve/default_plugins/models.py), the model types each accepts, and
# the checkpoint a bare name (`--model clip`) means.
PREFIX_TYPES = {"clip": ("clip",), "siglip": ("siglip",), "siglip2": ("siglip", "siglip2"),
                "chinese-clip": ("chinese_clip",)}
DEFAULT_CHECKPOINTS = {"clip": "openai/clip-vit-base-patch32", "siglip": "google/siglip-base-patch16-224",
                       "siglip2": "google/siglip2-base-patch16-224",
                       "chinese-clip": "OFA-Sys/chinese-clip-vit-base-patch16"}
SIGLIP_TEXT_LENGTH = 64  # SigLIP's text tower was trained on texts padded to 64 tokens, pooled at the last one
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]  # what a pair needs from a hub repository
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbers, as processor configs store them


# -- where a checkpoint is, and what identifies it -------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    folder: Path  # a local folder with config.json and weights (for a hub id: its snapshot in the cache)
    name: str  # as the user gave it (hub id, or the absolute folder)
    revision: str | None  # the hub commit, None for a local folder
    identity: tuple  # what changes when the checkpoint does (hashable; JSON-able as a list)

    @property
    def options(self) -> dict[str, Any]:
        """The encoder options that rebuild a tower of exactly this checkpoint. A local folder has
        no revision; ``files:HASH`` of its file list stands in, so that a changed folder is another
        set of options (and another entry in every cache keyed by them); ``locate`` ignores it."""
        if self.revision is None and self.identity:
            stamp = hashlib.sha256(json.dumps(self.identity).encode()).hexdigest()[:16]
            return {"checkpoint": self.name, "revision": f"files:{stamp}"}
        return {"checkpoint": self.name, "revision": self.revision}


def unreachable(name: str) -> InputError:
    return InputError(f"the checkpoint {name!r} is not in the local model cache and cannot be downloaded (the model "
                      f"hub does not answer, or HF_HUB_OFFLINE is set); download it once with network access (later "
                      f"runs can set HF_HUB_OFFLINE=1), or point at a folder written by save_pretrained with "
                      f"`--model clip:local-dir:PATH` (siglip:, chinese-clip: likewise) or `--model PATH`")


def _folder_identity(folder: Path) -> tuple:
    """Name, size and modification time of each file in the folder: a changed checkpoint is noticed
    without reading its weights."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
                 if p.is_file() and not p.name.startswith("."))


def locate(checkpoint: str, revision: str | None = None) -> Checkpoint:
    """A hub id, a folder, or ``local-dir:FOLDER`` as a local folder: a hub id from the cache first,
    downloaded only when the hub answers, else one sentence. A folder's ``revision`` (``files:...``,
    see Checkpoint.options) is not checked: the towers' weight digests are."""
    name = str(checkpoint)
    is_path = name.startswith(LOCAL_DIR)
    name = os.path.expanduser(name[len(LOCAL_DIR):] if is_path else name)
    if is_path or Path(name).is_dir() or Path(name).is_absolute() or name.startswith((".", "~")):
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise InputError(f"cannot load the checkpoint {name!r}: "
                             f"{'no such folder' if not folder.is_dir() else 'it has no config.json'}; give a "
                             f"folder written by transformers' save_pretrained")
        folder = folder.resolve()
        return Checkpoint(folder, str(folder), None, _folder_identity(folder))
    return _hub_checkpoint(name, revision)


def _hub_checkpoint(repo: str, revision: str | None) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        try:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
        except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError)
            if offline_requested() or not hub_reachable():
                raise unreachable(repo) from None
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except HFValidationError:
        raise InputError(f"{repo!r} is neither a folder nor a model hub id (owner/name); give a folder written by "
                         f"save_pretrained, or a hub id") from None
    except OSError as exc:
        raise InputError(f"cannot download the checkpoint {repo!r}: {str(exc).splitlines()[0]}") from None
    commit = folder.name  # the snapshot folder is named after the commit
    return Checkpoint(folder, repo, commit, ("hub", repo, commit))


def _checkpoint_json(path: Path) -> dict[str, Any]:
    """A JSON file of a checkpoint folder; a damaged one is one sentence naming it."""
    return read_json_object(path, lambda problem: InputError(
        f"cannot load the checkpoint in {path.parent}: {problem}; save it again with save_pretrained"))


def read_model_type(location: Checkpoint) -> str:
    return str(_checkpoint_json(location.folder / "config.json").get("model_type", ""))


# -- the checkpoint, loaded once per process -------------------------------------------------------
def _check_supported(model_type: str, name: str) -> None:
    if model_type == "siglip2":
        raise InputError(f"{name} is a SigLIP 2 NaFlex checkpoint (variable resolution), which mmretrieve does not "
                         f"support; use a fixed-resolution SigLIP 2 checkpoint such as google/siglip2-base-patch16-224")
    if model_type not in CLASSES:
        raise InputError(f"{name} is a {model_type or 'unknown'!r} checkpoint; mmretrieve takes the pair model types "
                         f"{', '.join(sorted(CLASSES))} from transformers")


@functools.lru_cache(maxsize=2)
def _load_pretrained(folder: str, identity: tuple) -> nn.Module:
    """The whole pair model (cached per checkpoint: the text and image towers, the bundle's
    reference weights and every later load take their parts from one read of the weights)."""
    import transformers

    model_type = read_model_type(Checkpoint(Path(folder), folder, None, identity))
    _check_supported(model_type, folder)
    pair_class = getattr(transformers, CLASSES[model_type][0])
    try:
        with quiet_transformers():
            return pair_class.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:  # no weights file, a truncated one, a config that does not fit
        raise InputError(f"cannot load the checkpoint in {folder}: {str(exc).strip().splitlines()[0]}") from None


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _tower_model(location: Checkpoint, modality: str, pretrained: bool) -> tuple[nn.Module, Any, str]:
    """(the tower's transformers sub-model, the pair config, model_type); a copy, so training one
    tower never touches the cached checkpoint."""
    import transformers

    model_type = read_model_type(location)
    _check_supported(model_type, location.name)
    if pretrained:
        pair = _load_pretrained(str(location.folder), location.identity)
        return copy.deepcopy(pair.text_model if modality == "text" else pair.vision_model), pair.config, model_type
    config = _config(location.folder)
    classes = CLASSES[model_type]
    if modality == "text":
        kwargs = {"add_pooling_layer": False} if model_type == "chinese_clip" else {}
        return getattr(transformers, classes[1])(config.text_config, **kwargs).eval(), config, model_type
    return getattr(transformers, classes[2])(config.vision_config).eval(), config, model_type


# -- preprocessing, from the checkpoint's own files -------------------------------------------------
def _siglip_fast_tokenizer(slow):
    """SigLIP's SentencePiece tokenizer as a tokenizers.Tokenizer: transformers' converter, plus the
    text canonicalisation SiglipTokenizer does in Python (lower case, no punctuation, one space)
    and its end-of-text token."""
    from tokenizers import Regex, normalizers, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    fast = SpmConverter(slow).converted()
    canon = [normalizers.Lowercase()] if getattr(slow, "do_lower_case", True) else []
    canon += [normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
              normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    fast.normalizer = normalizers.Sequence(canon + ([fast.normalizer] if fast.normalizer is not None else []))
    eos = str(slow.eos_token)
    fast.post_processor = processors.TemplateProcessing(single=["$A", eos], special_tokens=[(eos, slow.eos_token_id)])
    return fast


@functools.lru_cache(maxsize=4)
def _tokenizer_settings(folder: str, identity: tuple, model_type: str, positions: int) -> tuple[str, dict]:
    """The checkpoint's tokenizer as tokenizer.json text, and the TextPreprocessConfig fields (cached:
    each tower build, and the bundle's reference check, would read the tokenizer again)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "is_fast", False):
        fast = tokenizer.backend_tokenizer.to_str()
    elif model_type == "siglip":
        fast = _siglip_fast_tokenizer(tokenizer).to_str()
    else:
        raise InputError(f"{folder}: its tokenizer ({type(tokenizer).__name__}) has no fast version (tokenizer.json)")
    limit = int(getattr(tokenizer, "model_max_length", positions) or positions)
    max_length = min(positions, limit) if limit < 100_000 else positions
    siglip = model_type == "siglip"
    pad = tokenizer.pad_token
    return fast, {"max_length": min(max_length, SIGLIP_TEXT_LENGTH) if siglip else max_length,
                  "padding": "max_length" if siglip else "longest", "pad_token": None if pad is None else str(pad)}


def text_preprocessor(location: Checkpoint, model_type: str, config) -> TextPreprocessor:
    """The checkpoint's tokenizer (SigLIP's SentencePiece one converted), its pad token, its length
    limit, and for SigLIP padding to 64 tokens, as its processor does."""
    from tokenizers import Tokenizer

    positions = int(getattr(config.text_config, "max_position_embeddings", 77))
    fast, settings = _tokenizer_settings(str(location.folder), location.identity, model_type, positions)
    return TextPreprocessor(Tokenizer.from_str(fast), TextPreprocessConfig(**settings))


def _side(value, key: str) -> int:
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        height, width = int(value["height"]), int(value["width"])
        if height != width:
            raise InputError(f"the checkpoint's images are {height}x{width}; mmretrieve takes square inputs only")
        return height
    return int(value)


def image_preprocess_config(folder: Path) -> ImagePreprocessConfig:
    """The checkpoint's preprocessor_config.json as the project's image preprocessing: resize the
    shorter side and centre-crop (CLIP, Chinese-CLIP), or squash to the square (SigLIP)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no preprocessor_config.json; save the checkpoint's image processor beside it "
                         f"(processor.save_pretrained)")
    data = _checkpoint_json(path)
    resample = RESAMPLE.get(int(data.get("resample", 3)))
    if resample is None:
        raise InputError(f"{path}: resample {data.get('resample')} is not one mmretrieve reproduces (nearest, bilinear, "
                         f"bicubic, lanczos)")
    if data.get("do_rescale", True) and abs(float(data.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise InputError(f"{path}: rescale_factor {data['rescale_factor']} is not 1/255")
    normalize = data.get("do_normalize", True)
    mean = tuple(float(v) for v in data.get("image_mean", (0.5,) * 3)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in data.get("image_std", (0.5,) * 3)) if normalize else (1.0, 1.0, 1.0)
    if data.get("do_center_crop", False):
        side = _side(data["crop_size"], "height")
        shortest = _side(data["size"], "shortest_edge")
        crop_pct = side / shortest
        while int(side / crop_pct) < shortest:  # floor(side / crop_pct) must give back `shortest` exactly
            crop_pct = np.nextafter(crop_pct, 0.0)
        return ImagePreprocessConfig(size=side, crop_pct=float(crop_pct), interpolation=resample, mean=mean, std=std,
                                     crop_offset="floor")
    if isinstance(data.get("size"), dict) and "shortest_edge" in data["size"]:
        raise InputError(f"{path}: the processor resizes the shorter side without cropping, so images keep their "
                         f"shapes; mmretrieve takes checkpoints with square inputs only")
    return ImagePreprocessConfig(size=_side(data["size"], "height"), crop_pct=1.0, interpolation=resample, mean=mean,
                                 std=std, resize="squash")


# -- the two towers ---------------------------------------------------------------------------------
class PairTextTower(nn.Module):
    """(input_ids, attention_mask) -> the checkpoint's pooled text features, before projection."""

    def __init__(self, model: nn.Module, model_type: str, pad_id: int, pad_to: int):
        super().__init__()
        self.model = model
        self.model_type = model_type
        self.pad_id = int(pad_id)
        self.pad_to = int(pad_to)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.model_type == "clip":  # the end-of-text token's state, after the final layer norm
            return self.model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.model_type == "chinese_clip":  # the BERT's [CLS] state
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state[:, 0]
        # SigLIP: no attention mask; always padded to pad_to (its last position is pooled), even
        # when a runtime cut the batch to its longest text.
        ids = torch.where(attention_mask > 0, input_ids, torch.full_like(input_ids, self.pad_id))
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.pad_id).expand(-1, self.pad_to)], dim=1)[:, :self.pad_to]
        return self.model(input_ids=ids).pooler_output


class PairImageTower(nn.Module):
    """pixel_values -> the checkpoint's pooled image features, before projection (CLIP: the
    post-layernorm CLS state; SigLIP: its attention-pool head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


class _PairEncoder(Encoder):
    lora_targets = ("q_proj", "k_proj", "v_proj", "query", "key", "value")

    def __init__(self, checkpoint: str, revision: str | None = None, pretrained: bool = True):
        """checkpoint: hub id, folder, or local-dir:FOLDER; revision: a hub branch, tag or commit."""
        self._init(locate(checkpoint, revision), pretrained)

    def _init(self, location: Checkpoint, pretrained: bool) -> None:
        raise NotImplementedError

    def layer_groups(self) -> list[list[str]]:
        names = [name for name, _ in self.module.named_parameters()]
        encoder = self.module.model.encoder
        layers, attribute = (encoder.layers, "layers") if hasattr(encoder, "layers") else (encoder.layer, "layer")
        groups = [[n for n in names if n.startswith(f"model.encoder.{attribute}.{i}.")] for i in range(len(layers))]
        in_layers = {n for group in groups for n in group}
        first = [n for n in names if n.startswith(("model.embeddings.", "model.pre_layrnorm."))]
        rest = [n for n in names if n not in in_layers and n not in first]  # final norm, pooling head
        return [first, *groups] + ([rest] if rest else [])

    def enable_grad_checkpointing(self) -> None:
        model = self.module.model
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    def save_architecture(self, folder: Path) -> dict[str, Any]:
        """The pair's config.json and this tower's preprocessing: from_bundle rebuilds it offline."""
        folder = Path(folder)
        self.pair_config.save_pretrained(folder)
        self.preprocessor.save(folder)
        return dict(self.options)

    @classmethod
    def from_bundle(cls, folder: Path, options: dict[str, Any]) -> "_PairEncoder":
        """The config.json saved in the tower folder stands in for the checkpoint (random weights,
        which the bundle's replace); load_bundle loads the saved preprocessing."""
        encoder = cls.__new__(cls)
        folder = Path(folder)
        location = Checkpoint(folder, str(options.get("checkpoint", folder)), options.get("revision"), ())
        encoder._init(location, pretrained=False)
        encoder.options = {"checkpoint": options.get("checkpoint"), "revision": options.get("revision")}
        return encoder


class PairTextEncoder(_PairEncoder):
    family = "hf-pair-text"
    modality = "text"
    input_names = ("input_ids", "attention_mask")
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}

    def _init(self, location: Checkpoint, pretrained: bool) -> None:
        model, config, model_type = _tower_model(location, "text", pretrained)
        self.pair_config, self.model_type, self.options = config, model_type, location.options
        if pretrained or (location.folder / "preprocessor_config.json").is_file():
            preprocessor = text_preprocessor(location, model_type, config)
        else:  # a bundle's tower folder: load_bundle puts the saved preprocessing in its place
            from tokenizers import Tokenizer

            preprocessor = TextPreprocessor(Tokenizer.from_file(str(location.folder / TextPreprocessor.tokenizer_file)),
                                            TextPreprocessConfig(**json.loads(
                                                (location.folder / TextPreprocessor.file_name).read_text())))
        pad_id = preprocessor.tokenizer.padding["pad_id"]
        tower = PairTextTower(model, model_type, pad_id, preprocessor.config.max_length)
        Encoder.__init__(self, tower, preprocessor, config.text_config.hidden_size if model_type != "siglip"
                         else _siglip_text_dim(config))

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        return self.preprocess(["an example caption"] * (batch - 1) + ["a longer example caption with more words"])


def _siglip_text_dim(config) -> int:
    text = config.text_config
    return int(getattr(text, "projection_size", None) or text.hidden_size)


class PairImageEncoder(_PairEncoder):
    family = "hf-pair-image"
    modality = "image"
    input_names = ("pixel_values",)
    dynamic_axes = {"pixel_values": {0: "batch"}}

    def _init(self, location: Checkpoint, pretrained: bool) -> None:
        model, config, model_type = _tower_model(location, "image", pretrained)
        if model_type == "siglip" and not getattr(config.vision_config, "vision_use_head", True):
            raise InputError(f"{location.name}: a SigLIP vision tower without its attention-pool head "
                             f"(vision_use_head false) has no pooled output to embed with")
        self.pair_config, self.model_type, self.options = config, model_type, location.options
        if (location.folder / "preprocessor_config.json").is_file():
            preprocess = image_preprocess_config(location.folder)
        else:  # a bundle's tower folder
            preprocess = ImagePreprocessor.load(location.folder).config
        Encoder.__init__(self, PairImageTower(model), ImagePreprocessor(preprocess), config.vision_config.hidden_size)

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        size = self.preprocessor.config.size
        return {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}


# -- a checkpoint as PairParts, and the model prefixes' factories -----------------------------------
def pair_parts(location: Checkpoint, kind: str) -> PairParts:
    """The two towers, projections and temperature of a loaded checkpoint."""
    from ..encoders import create_encoder

    text = create_encoder("hf-pair-text", **location.options)
    image = create_encoder("hf-pair-image", **location.options)
    pair = _load_pretrained(str(location.folder), location.identity)
    projection = {name: getattr(pair, name).weight.detach().clone() if hasattr(pair, name) else None
                  for name in ("text_projection", "visual_projection")}
    bias = getattr(pair, "logit_bias", None)
    source = {"kind": kind, "model_type": text.model_type, "checkpoint": location.name,
              "revision": location.revision, "identity": [list(item) if isinstance(item, tuple) else item
                                                          for item in location.identity]}
    return PairParts(text=text, image=image,
                     text_tower=TowerConfig("hf-pair-text", dict(location.options)),
                     image_tower=TowerConfig("hf-pair-image", dict(location.options)),
                     text_projection=projection["text_projection"], image_projection=projection["visual_projection"],
                     logit_scale=float(pair.logit_scale.detach().reshape(-1)[0]),
                     logit_bias=None if bias is None else float(bias.detach().reshape(-1)[0]), source=source)


def pair_model(prefix: str, rest: str | None = None) -> Path:
    """The cached bundle of ``PREFIX:rest`` (``rest`` None: the prefix's default checkpoint). A hub
    id may name a revision as ``owner/name@revision``."""
    checkpoint = rest or DEFAULT_CHECKPOINTS[prefix]
    revision = None
    if not checkpoint.startswith(LOCAL_DIR) and "@" in checkpoint and not Path(checkpoint).exists():
        checkpoint, _, revision = checkpoint.partition("@")
    location = locate(checkpoint, revision or None)
    model_type = read_model_type(location)
    if model_type not in PREFIX_TYPES[prefix]:
        better = next((p for p, types in PREFIX_TYPES.items() if model_type in types), None)
        hint = f"; use --model {better}:{rest or checkpoint}" if better else ""
        raise InputError(f"{location.name} is a {model_type or 'unknown'!r} checkpoint, not a {prefix} one{hint}")
    _check_supported(model_type, location.name)
    ref = f"{prefix}:{rest or checkpoint}"
    return pair_bundle(ref, lambda: pair_parts(location, prefix),
                       identity={"checkpoint": location.name, "revision": location.revision,
                                 "files": [list(item) if isinstance(item, tuple) else item
                                           for item in location.identity]})


def clip(rest: str | None = None) -> Path:
    return pair_model("clip", rest)


def siglip(rest: str | None = None) -> Path:
    return pair_model("siglip", rest)


def siglip2(rest: str | None = None) -> Path:
    return pair_model("siglip2", rest)


def chinese_clip(rest: str | None = None) -> Path:
    return pair_model("chinese-clip", rest)
