"""Finding the files to index and deciding which are new, changed or gone.

A file is unchanged when its size and mtime match what the index recorded. When only the
mtime moved (a copy, a touch), its content hash decides, so a re-save of the same bytes is not
embedded again.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..formats import sha256_file
from ..images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class FileState:
    path: str  # absolute, resolved
    size: int
    mtime_ns: int


@dataclass
class ScanPlan:
    new: list[FileState] = field(default_factory=list)
    changed: list[FileState] = field(default_factory=list)  # content differs: re-embed
    touched: list[tuple[FileState, str]] = field(default_factory=list)  # same bytes, new mtime: (state, sha256)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def to_embed(self) -> list[FileState]:
        return self.new + self.changed

    def re_embed(self, states: list[FileState]) -> None:
        """Count files the scan found unchanged or touched as changed (their captions moved)."""
        moving = {s.path for s in states}
        touched = [(s, h) for s, h in self.touched if s.path not in moving]
        self.unchanged -= len(moving) - (len(self.touched) - len(touched))
        self.touched = touched
        self.changed += states


def _matches(relative: str, patterns: Iterable[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def scan_files(root: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[FileState]:
    """Image files below ``root`` (recursively, hidden entries skipped), filtered by glob
    patterns matched against the path relative to ``root`` or the file name."""
    root = Path(root)
    if root.is_file():
        stat = root.stat()
        return [FileState(str(root.resolve()), stat.st_size, stat.st_mtime_ns)]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or folder")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if include and not _matches(relative, include):
                continue
            if exclude and _matches(relative, exclude):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue  # vanished between listing and stat, or a dangling link
            found.append(FileState(str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return found


def plan_changes(found: list[FileState], known: dict[str, tuple[int, int, str | None]],
                 scope: str | None = None) -> ScanPlan:
    """Compare a scan with the index's records {path: (size, mtime_ns, sha256)}.

    Only records under ``scope`` (the scanned root) can vanish, so indexing a second folder
    into the same index leaves the first one's files alone.
    """
    plan = ScanPlan()
    seen = set()
    for state in found:
        seen.add(state.path)
        record = known.get(state.path)
        if record is None:
            plan.new.append(state)
            continue
        size, mtime_ns, digest = record
        if size == state.size and mtime_ns == state.mtime_ns:
            plan.unchanged += 1
        elif size == state.size and digest and sha256_file(state.path) == digest:
            plan.touched.append((state, digest))
        else:
            plan.changed.append(state)
    prefix = None if scope is None else scope.rstrip("/") + "/"
    plan.vanished = [p for p in known if p not in seen and (prefix is None or p.startswith(prefix) or p == scope)]
    return plan
