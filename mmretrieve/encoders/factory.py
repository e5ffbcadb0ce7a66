"""timm-style factory: ``create_encoder(name, **overrides)`` and ``list_encoders()``."""

from __future__ import annotations

from typing import Any

from ..errors import UnknownNameError
from ..plugins import get_host
from ..specs import EncoderSpec


def resolve_encoder_name(name: str) -> tuple[EncoderSpec, dict[str, Any]]:
    """Map a name, or a prefixed one such as ``timm:resnet50`` or ``hf-hub:bert-base-uncased``,
    to its spec and the options the prefix implies."""
    registry = get_host().registry("encoder")
    if name in registry:
        return registry.get(name), {}
    prefix, sep, rest = name.partition(":")
    if sep and rest:
        for spec in registry:
            if f"{prefix}:" in spec.prefixes:
                return spec, {spec.prefix_option: rest}
    raise UnknownNameError(registry.unknown_message(name))


def encoder_spec(name: str) -> EncoderSpec:
    return resolve_encoder_name(name)[0]


def create_encoder(name: str, **overrides: Any):
    """Build a registered encoder; ``overrides`` replace the spec's default options."""
    spec, implied = resolve_encoder_name(name)
    options = {**spec.defaults, **implied, **overrides}
    encoder = spec.build(**options)
    encoder.registered_name = spec.name
    return encoder


def list_encoders(pattern: str | None = None, modality: str | None = None) -> list[str]:
    registry = get_host().registry("encoder")
    return [n for n in registry.names(pattern) if modality is None or registry.get(n).modality == modality]
