"""Finding the files to index and deciding which are new, changed or gone.

A file is unchanged when its size and mtime match what the index recorded. When only the
mtime moved (a copy, a touch), its content hash decides, so a re-save of the same bytes is not
embedded again.

Paths are recorded as found: the folder's resolved path joined with the path below it, links
not resolved, so a removed link vanishes like any file. Only regular files are candidates.
Links are followed while they stay inside the folder (all of them with ``follow_links``);
a file reachable by two paths is indexed once; everything passed over is listed with a reason.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..formats import sha256_file
from ..images import IMAGE_SUFFIXES, special_file_reason

# A run may remove at most this many items under its folder, or this share of them, whichever
# is larger, without --prune: more looks like an unmounted disk or a narrowed --include.
PRUNE_MIN_ITEMS = 10
PRUNE_SHARE = 0.2


@dataclass(frozen=True)
class FileState:
    path: str  # absolute: the resolved root joined with the path found below it (links kept)
    size: int
    mtime_ns: int


@dataclass
class Scan:
    files: list[FileState] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: passed over, not read
    kept: list[str] = field(default_factory=list)  # unreadable folders: what was indexed below them stays
    links: list[str] = field(default_factory=list)  # links met below the folder (followed or not), as found


@dataclass
class ScanPlan:
    new: list[FileState] = field(default_factory=list)
    changed: list[FileState] = field(default_factory=list)  # content differs: re-embed
    touched: list[tuple[FileState, str]] = field(default_factory=list)  # same bytes, new mtime: (state, sha256)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files: what was indexed stays
    under_root: int = 0  # indexed items under the scanned root before this run

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


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_root(root: str | Path) -> Path:
    """``root`` if it is a folder or a regular file (links followed); InputError otherwise.
    Called before anything is created, so a mistyped folder leaves no index folder behind."""
    root = Path(root)
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{root}: no such file or folder") from None
    except OSError as exc:
        raise InputError(f"{root}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not stat.S_ISDIR(mode) and special_file_reason(mode):
        raise InputError(f"{root} {special_file_reason(mode)} nor a folder of images")
    return root


class _Walker:
    """Walks real folders first, then the links found in them (in order), so a file or folder
    reachable both directly and through a link is taken by its own path."""

    def __init__(self, base: str, include, exclude, suffixes, follow_links: bool):
        self.base, self.include, self.exclude, self.suffixes = base, include, exclude, suffixes
        self.follow_links = follow_links
        self.scan = Scan()
        self.files: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> path taken
        self.folders: dict[tuple[int, int], str] = {}
        self.links: list[tuple[str, str]] = []  # (path, relative), in the order found

    def skip(self, path: str, reason: str) -> None:
        self.scan.skipped.append({"path": path, "reason": reason})

    def candidate(self, relative: str) -> bool:
        name = relative.rsplit("/", 1)[-1]
        if not name.lower().endswith(self.suffixes):
            return False
        if self.include and not _matches(relative, self.include):
            return False
        return not (self.exclude and _matches(relative, self.exclude))

    def run(self) -> Scan:
        info = os.stat(self.base)
        self.folders[(info.st_dev, info.st_ino)] = self.base
        self.walk(self.base, "")
        position = 0
        while position < len(self.links):  # following a folder link may find more links
            self.follow(*self.links[position])
            position += 1
        return self.scan

    def walk(self, top: str, top_relative: str) -> None:
        stack = [(top, top_relative)]
        while stack:
            folder, relative = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError as exc:
                self.skip(folder, f"folder cannot be read ({exc.strerror or exc}); what was indexed from it is kept")
                self.scan.kept.append(folder)
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path, rel = f"{folder}/{entry.name}", f"{relative}{entry.name}"
                try:
                    if entry.is_symlink():
                        self.links.append((path, rel))
                        self.scan.links.append(path)
                    elif entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        if self.new_folder(path, info):
                            subfolders.append((path, rel + "/"))
                    elif self.candidate(rel):
                        self.add_file(path, entry.stat(follow_symlinks=False))
                except OSError:
                    continue  # vanished between listing and stat
            stack.extend(reversed(subfolders))

    def new_folder(self, path: str, info: os.stat_result) -> bool:
        key = (info.st_dev, info.st_ino)
        if key not in self.folders:
            self.folders[key] = path
            return True
        first = self.folders[key]
        if _inside(os.path.dirname(path), first):  # reached again from inside itself
            self.skip(path, f"a link loop: it leads back to {first}, which holds it")
        else:
            self.skip(path, f"the same folder as {first}, scanned once")
        return False

    def add_file(self, path: str, info: os.stat_result) -> None:
        if special_file_reason(info.st_mode):
            self.skip(path, special_file_reason(info.st_mode))
            return
        key = (info.st_dev, info.st_ino)
        if key in self.files:
            self.skip(path, f"the same file as {self.files[key]}, indexed once")
            return
        self.files[key] = path
        self.scan.files.append(FileState(path, info.st_size, info.st_mtime_ns))

    def follow(self, path: str, relative: str) -> None:
        try:
            info = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.skip(path, "a link loop: the link leads back to itself")
            elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
                if self.candidate(relative) or "." not in relative.rsplit("/", 1)[-1]:  # an image, or maybe a folder
                    self.skip(path, "a dangling link: what it points to does not exist")
            else:
                self.skip(path, f"a link that cannot be followed ({exc.strerror or exc})")
            return
        is_folder = stat.S_ISDIR(info.st_mode)
        if not is_folder and not self.candidate(relative):
            return
        # Resolving walks every component of the path with lstat (0.07 ms a link on the benchmark's
        # data), so only a scan that must keep links inside the folder resolves them.
        target = None if self.follow_links else os.path.realpath(path)
        if target is not None and not _inside(target, self.base):
            self.skip(path, f"a link to {target}, outside the folder; pass --follow-links to index it")
        elif not is_folder:
            self.add_file(path, info)
        elif self.new_folder(path, info):
            self.walk(path, relative + "/")


def scan_files(root: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               suffixes: tuple[str, ...] = IMAGE_SUFFIXES, follow_links: bool = False) -> Scan:
    """Regular image files below ``root`` (recursively, hidden entries skipped), filtered by glob
    patterns matched against the path relative to ``root`` or the file name, with what was passed
    over and why. Links are followed inside ``root`` (anywhere with ``follow_links``)."""
    root = check_root(root)
    if not root.is_dir():
        info = root.stat()
        return Scan([FileState(str(root.resolve()), info.st_size, info.st_mtime_ns)])
    return _Walker(str(root.resolve()), include, exclude, suffixes, follow_links).run()


def _unreadable(path: str) -> str | None:
    """Why a file cannot be read (None when it can); opened non-blocking, so a FIFO put in its
    place since the scan does not hang the run."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        return special_file_reason(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def plan_changes(found: list[FileState], known: dict[str, tuple[int, int, str | None]],
                 scope: str | None = None, kept: Iterable[str] = ()) -> ScanPlan:
    """Compare a scan with the index's records {path: (size, mtime_ns, sha256)}.

    Only records under ``scope`` (the scanned root) can vanish, so indexing a second folder
    into the same index leaves the first one's files alone; records under a ``kept`` folder
    (one that could not be read) stay too. A file that cannot be read is skipped, not
    embedded, and what was indexed for it stays.
    """
    plan = ScanPlan()
    seen = set()
    for state in found:
        seen.add(state.path)
        record = known.get(state.path)
        if record is not None and record[:2] == (state.size, state.mtime_ns):
            plan.unchanged += 1
            continue
        problem = _unreadable(state.path)
        if problem is None and record is not None and record[0] == state.size and record[2]:
            try:
                if sha256_file(state.path) == record[2]:
                    plan.touched.append((state, record[2]))
                    continue
            except OSError as exc:
                problem = f"cannot be read ({exc.strerror or exc})"
        if problem is not None:
            kept_note = "; what was indexed for it is kept" if record is not None else ""
            plan.skipped.append({"path": state.path, "reason": problem + kept_note})
        elif record is None:
            plan.new.append(state)
        else:
            plan.changed.append(state)
    in_scope = [p for p in known if scope is None or _inside(p, scope)]
    plan.under_root = len(in_scope)
    plan.vanished = [p for p in in_scope if p not in seen and not any(_inside(p, folder) for folder in kept)]
    return plan


def check_removal(plan: ScanPlan, root: str, prune: bool) -> None:
    """Refuse, before anything changes, a run that would drop more than PRUNE_MIN_ITEMS or
    PRUNE_SHARE of the items under ``root`` (or all of them) unless ``prune``."""
    removing, under = len(plan.vanished), plan.under_root
    if prune or not removing or (removing <= max(PRUNE_MIN_ITEMS, PRUNE_SHARE * under) and removing < under):
        return
    raise InputError(f"this run would remove {removing} of the {under} indexed items under {root} (is the disk "
                     f"mounted? did --include or --exclude narrow?); pass --prune to remove them")
