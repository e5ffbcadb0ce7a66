"""The plugin manager: built-ins, entry points, blocking, error isolation, attribution.

Built-in modules and third-party packages travel the same road: each is a pluggy plugin
whose hooks receive a ``register`` callback. Hooks are called one plugin at a time so a
registration is attributed to its plugin, and a plugin that raises is reported and skipped
as a whole (``MMRETRIEVE_STRICT_PLUGINS=1`` re-raises instead).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from . import hookspecs
from .atomic import write_bytes_atomic
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
# "0" finds entry points by scanning the installed distributions every time, without the cache file.
ENV_CACHE = "MMRETRIEVE_PLUGIN_CACHE"
CACHE_FILE = "entry-points.json"
CACHE_FOLDERS = 64  # sys.path folders remembered (across every search path used lately)

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

    def load_entry_points(self, cached: bool = False) -> None:
        """Load the ``mmretrieve`` entry points; ``cached``: found through the discovery cache
        (``discover_entry_points``) rather than a scan of every installed distribution."""
        only = _env_list(ENV_LOAD)
        found = discover_entry_points() if cached else _scan_entry_points()
        for found_ep in sorted(found, key=lambda e: e.name):
            if only is not None and found_ep.name not in only:
                continue
            record = PluginRecord(found_ep.name, "entry-point", version=found_ep.version,
                                  distribution=found_ep.distribution)
            self._register_module(found_ep.name, found_ep.load, record)

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


def __getattr__(name: str):
    # importlib.metadata (and the email package under it) is imported only to scan distributions,
    # which a command whose entry points are cached never does; ``plugins.metadata`` still works.
    if name == "metadata":
        from importlib import metadata

        return metadata
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class FoundEntryPoint:
    name: str
    value: str  # "module" or "module:attribute", as in entry_points.txt
    distribution: str | None
    version: str | None
    metadata_file: str | None  # the distribution's entry_points.txt, whose change voids the cache

    def load(self) -> object:
        """The object the entry point names (what importlib.metadata.EntryPoint.load returns)."""
        import pkgutil

        return pkgutil.resolve_name(self.value.split("[", 1)[0].strip())  # extras ("[gpu]") choose no object

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "distribution": self.distribution,
                "version": self.version, "metadata_file": self.metadata_file}


def _found(ep, dist) -> FoundEntryPoint:
    folder = getattr(dist, "_path", None)  # PathDistribution's metadata folder, when it has one
    return FoundEntryPoint(ep.name, ep.value, getattr(dist, "name", None), getattr(dist, "version", None),
                           str(Path(folder) / "entry_points.txt") if folder is not None else None)


def _scan_entry_points() -> list[FoundEntryPoint]:
    """Every installed distribution's ``mmretrieve`` entry points (importlib.metadata's own search)."""
    from importlib import metadata

    return [_found(ep, getattr(ep, "dist", None)) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]


def _scan_folder(folder: str) -> list[FoundEntryPoint]:
    """The ``mmretrieve`` entry points of the distributions installed in one sys.path folder, the
    first of each name (as importlib.metadata keeps the first on the whole path)."""
    from importlib import metadata

    found, names = [], set()
    for dist in metadata.distributions(path=[folder]):
        folder_name = os.path.basename(str(getattr(dist, "_path", "")))
        name = _dist_key(folder_name) if folder_name else _dist_key("", dist.name or "")  # METADATA read only then
        if name in names:
            continue
        names.add(name)
        found += [_found(ep, dist) for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP)]
    return found


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/mmretrieve (~/.cache/mmretrieve): the one base of mmretrieve's caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmretrieve"


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


_METADATA_SUFFIXES = (".dist-info", ".egg-info")  # what importlib.metadata looks for in a folder


def _dist_key(stem: str, name: str = "") -> str:
    """A distribution's identity as importlib.metadata deduplicates it: the name in its metadata
    folder's name ("My.Pkg-1.0.dist-info" -> "my_pkg"), else its Name."""
    base, ext = os.path.splitext(stem)
    if ext.lower() in _METADATA_SUFFIXES:
        name = base.partition("-")[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed(folder: str) -> list[list] | None:
    """The distributions' metadata folders in ``folder`` with their times, sorted: what an install,
    upgrade or removal there changes (the folder's own time also changes with any other file)."""
    try:
        with os.scandir(folder) as entries:
            return sorted([entry.name, entry.stat().st_mtime_ns] for entry in entries
                          if entry.name.lower().endswith(_METADATA_SUFFIXES))
    except OSError:
        return None


def _current(record: Any, mtime: int | None, folder: str) -> bool:
    """Whether a folder's cached record still holds: the folder unchanged (same time, or the same
    distributions in it) and each entry_points.txt it lists unchanged."""
    # Another file changed there (a working folder): still good, and not rewritten for that
    if record["mtime"] != mtime and (mtime is None or record["installed"] != _installed(folder)):
        return False
    return all(row["metadata_file"] is None or _mtime(row["metadata_file"]) == row["mtime"]
               for row in record["entry_points"])


def _read_record(record: dict[str, Any]) -> tuple[list[tuple[str, FoundEntryPoint]], set[str]]:
    """A folder record's entry points, each with its distribution's key, and the keys of every
    distribution installed there; raises LookupError, TypeError or ValueError if it is malformed."""
    found = [(_dist_key(os.path.basename(os.path.dirname(row["metadata_file"] or "")), row["distribution"] or ""),
              FoundEntryPoint(row["name"], row["value"], row["distribution"], row["version"], row["metadata_file"]))
             for row in record["entry_points"]]
    return found, {_dist_key(name) for name, _ in record["installed"] or []}


def discover_entry_points() -> list[FoundEntryPoint]:
    """The ``mmretrieve`` entry points, remembered per sys.path folder in
    ``cache_dir()/entry-points.json`` and found again in a folder by a scan when the distributions
    in it or a listed entry_points.txt changed. Scanning every installed distribution cost ~45 ms of
    each command's start; the check costs a stat per sys.path entry (a listing of a folder whose
    time changed). Per folder, so a working folder that changes (``python -m`` puts it on sys.path)
    or processes with other search paths do not void each other's entries.
    MMRETRIEVE_PLUGIN_CACHE=0 turns it off; a cache that cannot be read or written is ignored."""
    if os.environ.get(ENV_CACHE, "") == "0":
        return _scan_entry_points()
    path = cache_dir() / CACHE_FILE
    try:
        folders = json.loads(path.read_text(encoding="utf-8"))["folders"]
        folders = {key: value for key, value in folders.items() if isinstance(value, dict)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        folders = {}
    found: list[FoundEntryPoint] = []
    seen: set[str] = set()  # distributions met on an earlier folder: importlib.metadata keeps the first
    used: dict[str, Any] = {}
    stale = False
    for entry in sys.path:
        mtime = _mtime(entry or os.curdir)
        # A folder by its absolute path ('' is the working folder); a path hook's name as it is.
        folder = os.path.abspath(entry or os.curdir) if mtime is not None else entry
        if folder in used:
            continue
        record = folders.get(folder)
        try:
            if not _current(record, mtime, folder):
                raise LookupError(folder)
            entry_points, installed = _read_record(record)
        except (LookupError, TypeError, ValueError, AttributeError):  # changed, new, or a damaged record
            rows = [{**ep.as_dict(), "mtime": _mtime(ep.metadata_file) if ep.metadata_file else None}
                    for ep in (_scan_folder(folder) if mtime is not None else [])]
            record = {"mtime": mtime, "installed": _installed(folder) if mtime is not None else None,
                      "entry_points": rows}
            entry_points, installed = _read_record(record)
            stale = True
        used[folder] = record
        found += [ep for key, ep in entry_points if key not in seen]
        seen.update(installed)
    if stale:
        kept = {**used, **{key: value for key, value in folders.items() if key not in used}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, json.dumps({"folders": dict(list(kept.items())[:CACHE_FOLDERS])}).encode("utf-8"))
        except OSError as exc:  # a read-only home: discovery still works, only slower
            log.debug("entry-point cache not written: %s", exc)
    return found


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
        host.load_entry_points(cached=True)
        _HOST = host
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in-process)."""
    global _HOST
    _HOST = None
