"""The plugin manager: built-ins, entry points, blocking, error isolation, attribution.

Built-in modules and third-party packages travel the same road: each is a pluggy plugin
whose hooks receive a ``register`` callback. Hooks are called one plugin at a time so a
registration is attributed to its plugin, and a plugin that raises is reported and skipped
as a whole (``MMRETRIEVE_STRICT_PLUGINS=1`` re-raises instead).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginLoadError, RegistrationError
from .registry import Registry
from .specs import Spec, EncoderSpec, FusionSpec, IndexBackendSpec, LossSpec, ModelSpec, RuntimeSpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mmretrieve"
# Comma-separated entry-point plugin names to load; set but empty loads none.
ENV_LOAD = "MMRETRIEVE_LOAD_PLUGINS"
# Comma-separated plugin names (built-in or third-party) never to register.
ENV_BLOCK = "MMRETRIEVE_BLOCK_PLUGINS"
# "1" turns a broken plugin from a logged skip into an error.
ENV_STRICT = "MMRETRIEVE_STRICT_PLUGINS"

BUILTIN_PLUGINS = (
    "mmretrieve.default_plugins.encoders",
    "mmretrieve.default_plugins.losses",
    "mmretrieve.default_plugins.fusion",
    "mmretrieve.default_plugins.runtimes",
    "mmretrieve.default_plugins.index_backends",
    "mmretrieve.default_plugins.models",
)

# kind -> (hook name, spec type); one registry per kind.
KINDS: dict[str, tuple[str, type]] = {
    "encoder": ("register_encoders", EncoderSpec),
    "fusion": ("register_fusion_strategies", FusionSpec),
    "loss": ("register_losses", LossSpec),
    "index_backend": ("register_index_backends", IndexBackendSpec),
    "runtime": ("register_runtimes", RuntimeSpec),
    "model": ("register_models", ModelSpec),
}


# How each kind is named in listings (`mmretrieve plugins`, its --json keys).
PLURALS = {"encoder": "encoders", "fusion": "fusion_strategies", "loss": "losses",
           "index_backend": "index_backends", "runtime": "runtimes", "model": "models"}


@dataclass
class PluginRecord:
    name: str  # the pluggy name: module path for built-ins, entry-point name otherwise
    source: str  # "builtin", "entry-point" or "manual"
    version: str | None = None
    distribution: str | None = None
    error: str | None = None  # why it was skipped, if it was
    registered: dict[str, list[str]] = field(default_factory=dict)  # kind -> names
    refused: list[str] = field(default_factory=list)  # registrations refused, with the reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "version": self.version,
            "distribution": self.distribution,
            "error": self.error,
            "refused": self.refused,
            **{PLURALS[kind]: names for kind, names in sorted(self.registered.items())},
        }


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


class PluginHost:
    """Owns the pluggy manager, the plugin records and one registry per kind."""

    def __init__(self, strict: bool | None = None):
        self.strict = os.environ.get(ENV_STRICT, "") == "1" if strict is None else strict
        self.pm = pluggy.PluginManager("mmretrieve")
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._registries: dict[str, Registry] | None = None
        for name in _env_list(ENV_BLOCK) or []:
            self.pm.set_blocked(name)

    # -- loading ---------------------------------------------------------------------------
    def load_builtins(self) -> None:
        for module_name in BUILTIN_PLUGINS:
            self._register_module(module_name, lambda m=module_name: importlib.import_module(m),
                                  PluginRecord(module_name, "builtin", version=_own_version()))

    def load_entry_points(self) -> None:
        only = _env_list(ENV_LOAD)
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if only is not None and ep.name not in only:
                continue
            dist = getattr(ep, "dist", None)
            record = PluginRecord(ep.name, "entry-point", version=getattr(dist, "version", None),
                                  distribution=getattr(dist, "name", None))
            self._register_module(ep.name, ep.load, record)

    def register(self, plugin: object, name: str, version: str | None = None) -> None:
        """Register a plugin object in-process (tests, notebooks, embedding applications)."""
        self._register_module(name, lambda: plugin, PluginRecord(name, "manual", version=version))

    def _register_module(self, name: str, load: Callable[[], object], record: PluginRecord) -> None:
        if self.pm.has_plugin(name):
            # Loaded already (load_* called twice) or another plugin claims the name: keep the first.
            first = self.records.get(name)
            if first is None or (first.source, first.distribution) != (record.source, record.distribution):
                log.warning("plugin name %r from %s is already taken; ignored", name, record.distribution or record.source)
            return
        self.records[name] = record
        if self.pm.is_blocked(name):
            record.error = f"blocked by {ENV_BLOCK}"
            return
        try:
            plugin = load()
            self.pm.register(plugin, name=name)
            try:
                self.pm.check_pending()  # a misspelled hook name would otherwise be ignored
            except pluggy.PluginValidationError:
                self.pm.unregister(name=name)
                raise
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            self._fail(record, f"failed to load: {type(exc).__name__}: {exc}", exc)
        self._registries = None

    def _fail(self, record: PluginRecord, message: str, exc: BaseException) -> None:
        record.error = message
        if self.strict:
            raise PluginLoadError(f"plugin {record.name!r} {message}") from exc
        log.warning("plugin %r skipped: %s", record.name, message)

    # -- calling hooks one plugin at a time -------------------------------------------------
    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of a hook, isolating and reporting failures per plugin."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            record = self.records.setdefault(impl.plugin_name, PluginRecord(impl.plugin_name, "manual"))
            if record.error:
                continue
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                self._fail(record, f"failed in {hook_name}: {type(exc).__name__}: {exc}", exc)

    def _collect(self) -> dict[str, Registry]:
        # First gather each plugin's declarations, so a plugin that raises in any hook is
        # dropped as a whole; then add them, refusing (not overwriting) clashing names.
        pending: dict[str, list[tuple[str, Any]]] = {}
        for kind, (hook_name, _) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                record = self.records.setdefault(impl.plugin_name, PluginRecord(impl.plugin_name, "manual"))
                if record.error:
                    continue
                declared: list = []
                try:
                    impl.function(register=declared.append)
                except Exception as exc:  # noqa: BLE001
                    self._fail(record, f"failed in {hook_name}: {type(exc).__name__}: {exc}", exc)
                    continue
                pending.setdefault(impl.plugin_name, []).extend((kind, spec) for spec in declared)

        registries = {kind: Registry(kind.replace("_", " "), spec_type) for kind, (_, spec_type) in KINDS.items()}
        for plugin_name, declarations in pending.items():
            record = self.records[plugin_name]
            if record.error:
                continue
            for kind, spec in declarations:
                try:
                    if not isinstance(spec, Spec):
                        raise RegistrationError(f"plugin {plugin_name!r} registered {spec!r}, which is not a spec")
                    spec = dataclasses.replace(spec, plugin=plugin_name)
                    registries[kind].add(spec)
                    record.registered.setdefault(kind, []).append(spec.name)
                except RegistrationError as exc:
                    if self.strict:
                        raise
                    log.warning("%s", exc)
                    record.refused.append(str(exc))
        return registries

    def registry(self, kind: str) -> Registry:
        if self._registries is None:
            for record in self.records.values():
                record.registered.clear()
                record.refused.clear()
            self._registries = self._collect()
        return self._registries[kind]


def _own_version() -> str:
    from . import __version__

    return __version__


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _HOST
    if _HOST is None:
        host = PluginHost()
        host.load_builtins()
        host.load_entry_points()
        _HOST = host
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in-process)."""
    global _HOST
    _HOST = None
