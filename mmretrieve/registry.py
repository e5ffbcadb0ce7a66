"""Name -> spec tables, one per kind of plugin contribution.

A table refuses a second registration of a name (or alias) rather than overwriting it, and
an unknown name raises an error that lists the closest registered names. Source prefixes
(an encoder's ``timm:``) are names too: a prefix registered by two plugins is refused the same way.
"""

from __future__ import annotations

import fnmatch
from typing import Generic, Iterator, TypeVar

from .errors import RegistrationError, UnknownNameError
from .specs import Spec

S = TypeVar("S", bound=Spec)


class Registry(Generic[S]):
    def __init__(self, kind: str, spec_type: type[S]):
        self.kind = kind  # "encoder", "loss", ... used in messages
        self.spec_type = spec_type
        self._specs: dict[str, S] = {}
        self._aliases: dict[str, str] = {}
        self._prefixes: dict[str, str] = {}  # "timm:" -> the name of the spec that owns it

    def add(self, spec: S) -> None:
        if not isinstance(spec, self.spec_type):
            raise RegistrationError(
                f"{spec!r} is not a {self.spec_type.__name__}; register_{self.kind}s expects that type"
            )
        spec.validate()
        for key in (spec.name, *spec.aliases):
            owner = self._owner(key)
            if owner is not None:
                raise RegistrationError(
                    f"{self.kind} name {key!r} from plugin {spec.plugin!r} clashes with the one "
                    f"registered by plugin {owner.plugin!r}; rename it or block one plugin"
                )
        prefixes = tuple(getattr(spec, "prefixes", ()))
        for prefix in prefixes:
            owner = self.prefix_owner(prefix)
            if owner is not None:
                raise RegistrationError(
                    f"{self.kind} prefix {prefix!r} of {spec.name!r} from plugin {spec.plugin!r} clashes with the "
                    f"one of {owner.name!r} registered by plugin {owner.plugin!r}; rename it or block one plugin"
                )
        self._specs[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.name
        for prefix in prefixes:
            self._prefixes[prefix] = spec.name

    def prefix_owner(self, prefix: str) -> S | None:
        """The spec that registered a source prefix such as ``"timm:"``, or None."""
        name = self._prefixes.get(prefix)
        return None if name is None else self._specs[name]

    def _owner(self, key: str) -> S | None:
        if key in self._specs:
            return self._specs[key]
        if key in self._aliases:
            return self._specs[self._aliases[key]]
        return None

    def get(self, name: str) -> S:
        spec = self._owner(name)
        if spec is None:
            raise UnknownNameError(self.unknown_message(name))
        return spec

    def unknown_message(self, name: str) -> str:
        import difflib  # here: only a name that is not registered needs it

        candidates = list(self._specs) + list(self._aliases)
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(self._specs)) or "none"
        return f"unknown {self.kind} {name!r}{hint} (registered: {known})"

    def names(self, pattern: str | None = None) -> list[str]:
        names = sorted(self._specs)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def __contains__(self, name: str) -> bool:
        return self._owner(name) is not None

    def __iter__(self) -> Iterator[S]:
        return iter(self._specs[n] for n in sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)
