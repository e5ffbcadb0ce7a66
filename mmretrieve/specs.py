"""What a plugin declares when it registers something: metadata and a lazy factory.

A factory is either a callable or a ``"package.module:attribute"`` string, so declaring an
encoder costs nothing and the heavy library behind it is imported when it is first built.
What each kind's factory is called with and must return is written in ``mmretrieve.hookspecs``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import RegistrationError

MODALITIES = ("text", "image")


def resolve_factory(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    """Import ``"module:attribute"`` (dots allowed in the attribute) or return the callable."""
    if callable(factory):
        return factory
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise RegistrationError(f"factory {factory!r} is not of the form 'package.module:attribute'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def unaccepted_options(factory: Callable[..., Any], names) -> list[str]:
    """The keyword arguments among ``names`` that ``factory`` cannot take: none when it takes
    ``**kwargs`` or has no signature to read."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return []
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [name for name in names if name not in named]


def rebuild_options(factory: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus ``pretrained=False`` when ``factory`` takes that argument: how an encoder
    is rebuilt from a bundle, whose own weights replace any pretrained ones."""
    return {**options, **({} if unaccepted_options(factory, ["pretrained"]) else {"pretrained": False})}


@dataclass(frozen=True)
class Spec:
    name: str  # the name users type; lower case, no spaces
    factory: str | Callable[..., Any]  # "module:attribute" or a callable that builds it
    description: str = ""  # one line for `mmretrieve plugins`
    aliases: tuple[str, ...] = ()  # other names that resolve to this one
    plugin: str = field(default="", compare=False)  # filled in by the registry

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name or " " in self.name:
            raise RegistrationError(f"{type(self).__name__} name {self.name!r} must be a non-empty word")
        if not (callable(self.factory) or (isinstance(self.factory, str) and ":" in self.factory)):
            raise RegistrationError(f"{self.name!r}: factory must be a callable or 'module:attribute'")

    def build(self, *args: Any, **kwargs: Any) -> Any:
        return resolve_factory(self.factory)(*args, **kwargs)


@dataclass(frozen=True)
class EncoderSpec(Spec):
    modality: str = "text"  # "text" or "image"
    defaults: dict[str, Any] = field(default_factory=dict)  # options used unless overridden
    prefixes: tuple[str, ...] = ()  # "timm:" lets users write timm:resnet50 for this encoder
    prefix_option: str = "model_name"  # the option a prefixed name fills in

    def validate(self) -> None:
        super().validate()
        if self.modality not in MODALITIES:
            raise RegistrationError(f"encoder {self.name!r}: modality must be one of {MODALITIES}, not {self.modality!r}")
        check_prefixes("encoder", self.name, self.prefixes)
        if callable(self.factory):  # a "module:attribute" factory is checked when first built, not imported here
            wanted = [*self.defaults, *([self.prefix_option] if self.prefixes else [])]
            wrong = unaccepted_options(self.factory, wanted)
            if wrong:
                raise RegistrationError(f"encoder {self.name!r}: its factory takes no argument "
                                        f"{', '.join(map(repr, wrong))}, which its defaults or prefixes pass")


@dataclass(frozen=True)
class FusionSpec(Spec):
    trainable: bool = False  # True when the strategy has parameters the contrastive core trains


@dataclass(frozen=True)
class LossSpec(Spec):
    pass


@dataclass(frozen=True)
class IndexBackendSpec(Spec):
    pass


@dataclass(frozen=True)
class RuntimeSpec(Spec):
    pass


def check_prefixes(kind: str, name: str, prefixes) -> None:
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.endswith(":") or len(prefix) < 2 or " " in prefix:
            raise RegistrationError(f"{kind} {name!r}: prefix {prefix!r} must be a word ending in ':', like 'timm:'")


@dataclass(frozen=True)
class ModelSpec(Spec):
    """A ready-made bundle; ``factory`` returns the path of its folder.

    ``factory()`` builds the model named ``name``; with ``prefixes`` ("clip:") a reference
    ``clip:REST`` calls ``factory(REST)`` (a pretrained pair: REST names its checkpoint)."""

    prefixes: tuple[str, ...] = ()  # "clip:" lets users write --model clip:openai/clip-vit-base-patch32

    def validate(self) -> None:
        super().validate()
        check_prefixes("model", self.name, self.prefixes)
