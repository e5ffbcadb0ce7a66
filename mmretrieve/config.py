"""Configuration dataclasses, config files (TOML, YAML, JSON) and ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass
class TowerConfig:
    encoder: str = "bert"  # registered encoder name, or a prefixed one such as timm:resnet50
    options: dict[str, Any] = field(default_factory=dict)  # passed to the encoder's factory


@dataclass
class BridgeConfig:
    enabled: bool = False  # add the label bridge (mmretrieve/bridge.py) beside the heads' space
    classifier: str = ""  # "module:function" returning the image tower's classifier (weight, bias)
    classes: str = "imagenet-1k"  # the classifier's class names (timm's ImageNet class descriptions)
    synonyms: int = 1  # names per class used: the first N lemmas of its description
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # prompts; {} is the class name
    top_t: int = 10  # classes kept per image (their probabilities renormalised)
    temperature: float = 1.0  # softmax temperature on the classifier's logits
    weight: float = 0.5  # w: share of the heads' similarity; the bridge's is 1 - w
    num_classes: int = 0  # the classifier's class count, set when the bridge is built


@dataclass
class ModelConfig:
    text: TowerConfig = field(default_factory=lambda: TowerConfig("bert"))  # the text tower
    image: TowerConfig = field(default_factory=lambda: TowerConfig("timm"))  # the image tower
    embed_dim: int = 256  # dimension of the shared embedding space
    head: str = "linear"  # projection head per tower: "linear" (no bias, as CLIP) or "mlp"
    init_temperature: float = 0.07  # softmax temperature at start; learned, stored as log(1/T)
    max_logit_scale: float = 100.0  # clamp on 1/T, as CLIP does, against a collapsing loss
    bridge: BridgeConfig = field(default_factory=BridgeConfig)  # zero-shot label bridge (off by default)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A mapping from a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - each parser has its own error type
        raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def parse_value(text: str) -> Any:
    """``--set`` values are JSON where they parse (numbers, true, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` assignments to a nested mapping (a copy is returned)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a dataclass from a mapping, recursing into nested dataclasses; unknown keys are
    refused with the closest valid names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {where + key!r}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = from_dict(kind, value, where=f"{where}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_config(cls: type[T], config_file: str | Path | None = None, overrides: tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> T:
    """``base`` < config file < ``--set`` overrides, as one dataclass."""
    data = dict(base or {})
    if config_file:
        data = _merge(data, read_config_file(config_file))
    return from_dict(cls, apply_overrides(data, overrides))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@dataclass
class TowerTraining:
    mode: str = "frozen"  # frozen (LiT), full, top:N (last N layers), bitfit (biases only) or lora
    lr: float = 1e-5  # learning rate for this tower's trainable parameters
    lora_rank: int = 8  # LoRA: rank of the adapters
    lora_alpha: int = 16  # LoRA: scaling numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # LoRA: dropout on the adapter input
    lora_targets: list[str] = field(default_factory=list)  # LoRA: module names; empty = the encoder's defaults
    grad_checkpointing: bool = False  # recompute activations in backward to save memory


@dataclass
class TrainConfig:
    data: str = ""  # training pairs: JSONL, CSV, COCO captions JSON, or a folder with .txt sidecars
    val_data: str | None = None  # validation pairs; default: a held-out split of `data`
    val_fraction: float = 0.05  # share of images held out when val_data is not given
    val_size: int | None = None  # exact number of held-out images (overrides val_fraction)
    model: ModelConfig = field(default_factory=ModelConfig)  # towers and heads of a fresh model
    init: str | None = None  # start from this bundle (or registered model) instead of `model`
    text: TowerTraining = field(default_factory=TowerTraining)  # what trains in the text tower
    image: TowerTraining = field(default_factory=TowerTraining)  # what trains in the image tower
    head_lr: float = 1e-3  # learning rate of projection heads, temperature and loss parameters
    loss: str = "infonce"  # a registered loss: infonce or siglip
    loss_options: dict[str, Any] = field(default_factory=dict)  # passed to the loss factory
    epochs: int = 10  # passes over the training images (one random caption per image each)
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 128  # image-caption pairs per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimiser step
    weight_decay: float = 0.1  # AdamW decay, never applied to norms, biases or the temperature
    warmup_steps: int = 50  # linear warm-up, then cosine decay to zero
    grad_clip: float | None = 1.0  # clip the global gradient norm; null disables
    precision: str = "auto"  # auto (bf16 on CUDA where supported, else fp16; fp32 on CPU), fp32, bf16, fp16
    eval_every: int | None = None  # optimiser steps between validations; default once per epoch
    patience: int | None = None  # validations without improvement before stopping early; null: never
    seed: int = 0  # model init, caption choice, data order and split
    workers: int = 2  # data-loading processes (decoding and preprocessing images)
    cache_frozen: bool = True  # embed frozen towers once and train on cached features
    image_views: int = 1  # cached views per training image of a frozen image tower: view 0 plain, the others augmented; one drawn per image each epoch
    image_view_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # augmented views: share of the image's area a random crop keeps (min, max)
    image_view_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # augmented views: the crop's width / height (min, max), squashed to a square
    image_view_flip: bool = True  # augmented views: mirror half of them left-right
    bridge_weights: list[float] = field(default_factory=list)  # label bridge: mixing weights tried at each validation; the best is kept
    strict_data: bool = False  # stop on the first unreadable image or malformed record
    bundle_towers: str = "auto"  # embed: bundles hold every weight; reference: towers' unchanged weights stay in their encoder's plugin (or checkpoint); auto: as the init bundle stores them (a pretrained pair: reference), else embed
    output: str = "runs/latest"  # run folder: best/ bundle, checkpoint/, metrics.jsonl, curves.png
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1, ...
    log_every: int = 10  # optimiser steps between metric log lines
