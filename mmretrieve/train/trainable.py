"""What trains in a tower: frozen (LiT), full, top:N layers, bitfit (biases) or LoRA adapters.

LoRA adapters come from peft, injected into the tower's own modules so names stay
predictable; bundles store the adapters merged into the base weights, so a trained model
loads and exports like any other.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import TowerTraining
from ..encoders.base import Encoder
from ..errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("frozen", "full", "top:N", "bitfit", "lora")


def parse_mode(mode: str) -> tuple[str, int]:
    if mode in ("frozen", "full", "bitfit", "lora"):
        return mode, 0
    if mode.startswith("top:"):
        try:
            count = int(mode[4:])
        except ValueError:
            count = -1
        if count >= 1:
            return "top", count
    raise ConfigError(f"tower training mode must be one of {', '.join(MODES)} (e.g. top:2), not {mode!r}")


def apply_training_mode(encoder: Encoder, settings: TowerTraining) -> int:
    """Set requires_grad on the tower (injecting LoRA adapters if asked); return the trainable count."""
    kind, count = parse_mode(settings.mode)
    module = encoder.module
    module.requires_grad_(kind == "full")
    if kind == "bitfit":
        for name, param in module.named_parameters():
            param.requires_grad_(name.endswith("bias"))
    elif kind == "top":
        groups = encoder.layer_groups()
        if count > len(groups):
            raise ConfigError(f"top:{count} asks for more layers than the {encoder.modality} tower has ({len(groups)})")
        chosen = {name for group in groups[-count:] for name in group}
        for name, param in module.named_parameters():
            param.requires_grad_(name in chosen)
    elif kind == "lora":
        inject_lora(encoder, settings)
    if settings.grad_checkpointing and kind != "frozen":
        encoder.enable_grad_checkpointing()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _lora_target_names(module: nn.Module, targets: tuple[str, ...]) -> list[str]:
    return [name for name, child in module.named_modules()
            if isinstance(child, (nn.Linear, nn.Conv2d)) and name.rsplit(".", 1)[-1] in targets]


def inject_lora(encoder: Encoder, settings: TowerTraining) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = tuple(settings.lora_targets) or encoder.lora_targets
    names = _lora_target_names(encoder.module, targets)
    if not names:
        raise ConfigError(
            f"LoRA found no layers named {', '.join(targets) or '(none)'} in the {encoder.modality} tower; "
            f"set {encoder.modality}.lora_targets to module names it has"
        )
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, encoder.module)
    for name, param in encoder.module.named_parameters():
        param.requires_grad_("lora_" in name)
    log.info("LoRA on %d %s-tower layers", len(names), encoder.modality)


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def merge_lora_in_place(module: nn.Module) -> None:
    """Fold every LoRA adapter into its base layer and put the base layer back in its place."""
    for name, child in list(module.named_modules()):
        if hasattr(child, "base_layer") and hasattr(child, "merge"):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, child.get_base_layer())
