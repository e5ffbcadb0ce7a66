"""timm-style factory: ``create_encoder(name, **overrides)`` and ``list_encoders()``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownNameError
from ..plugins import get_host
from ..specs import EncoderSpec, rebuild_options, resolve_factory, unaccepted_options


def resolve_encoder_name(name: str) -> tuple[EncoderSpec, dict[str, Any]]:
    """Map a name, or a prefixed one such as ``timm:resnet50`` or ``hf-hub:bert-base-uncased``,
    to its spec and the options the prefix implies."""
    registry = get_host().registry("encoder")
    if name in registry:
        return registry.get(name), {}
    prefix, sep, rest = name.partition(":")
    spec = registry.prefix_owner(f"{prefix}:") if sep and rest else None
    if spec is not None:
        return spec, {spec.prefix_option: rest}
    raise UnknownNameError(registry.unknown_message(name))


def encoder_spec(name: str) -> EncoderSpec:
    return resolve_encoder_name(name)[0]


def create_encoder(name: str, **overrides: Any):
    """Build a registered encoder; ``overrides`` replace the spec's default options."""
    spec, implied = resolve_encoder_name(name)
    options = {**spec.defaults, **implied, **overrides}
    factory = resolve_factory(spec.factory)
    wrong = unaccepted_options(factory, options)
    if wrong:
        known = [n for n, p in inspect.signature(factory).parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                           p.KEYWORD_ONLY)]
        raise ConfigError(f"encoder {spec.name!r} takes no option {', '.join(map(repr, wrong))} "
                          f"(its options: {', '.join(known) or 'none'})")
    encoder = factory(**options)
    encoder.registered_name = spec.name
    return encoder


def _own_from_bundle(factory: Any) -> bool:
    """True when ``factory`` is an Encoder class that rebuilds itself its own way."""
    from .base import Encoder

    return isinstance(factory, type) and issubclass(factory, Encoder) and \
        factory.from_bundle.__func__ is not Encoder.from_bundle.__func__


def rebuild_problem(family: str, options: dict[str, Any]) -> str | None:
    """Why ``rebuild_encoder`` could not rebuild a tower saved as ``family`` with ``options``
    (a clause for a sentence), or None when it can."""
    registry = get_host().registry("encoder")
    if family not in registry:
        return (f"its encoder family {family!r} is not a registered encoder name (an Encoder's `family` "
                f"must be the name its plugin registers it under)")
    spec = registry.get(family)
    factory = resolve_factory(spec.factory)
    wrong = [] if _own_from_bundle(factory) else unaccepted_options(factory, options)
    if wrong:
        return (f"the factory of the {family!r} encoder (plugin {spec.plugin!r}) takes no argument "
                f"{', '.join(map(repr, wrong))}, which its save_architecture returned")
    return None


def rebuild_encoder(family: str, folder: Path, options: dict[str, Any]):
    """The tower a bundle stored: ``from_bundle(folder, options)`` of the Encoder class registered
    as ``family``, or, for a factory function, ``factory(**options)`` with ``pretrained=False``
    when it takes that argument. An unregistered family raises UnknownNameError."""
    spec = get_host().registry("encoder").get(family)
    factory = resolve_factory(spec.factory)
    # The registered defaults apply as they did when the tower was built (create_encoder merges
    # them), except `pretrained`: the bundle holds the weights.
    options = {**{k: v for k, v in spec.defaults.items() if k != "pretrained"}, **options}
    if isinstance(factory, type) and hasattr(factory, "from_bundle"):
        return factory.from_bundle(Path(folder), dict(options))
    return factory(**rebuild_options(factory, options))


def list_encoders(pattern: str | None = None, modality: str | None = None) -> list[str]:
    registry = get_host().registry("encoder")
    return [n for n in registry.names(pattern) if modality is None or registry.get(n).modality == modality]
