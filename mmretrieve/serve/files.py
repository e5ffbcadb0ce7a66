"""Which files the service may send, and opening them so that what was checked is what is sent.

A client names an item by its integer id, never by a path; the path comes from the index.
The file is still refused unless, at the moment it is opened,
- its real path (every symlink resolved) is the path the index recorded, so a file that has
  been replaced by a symlink since indexing, or a folder on its way that has, is not followed;
- that real path lies inside one of the served roots (``--root``; by default the folder that
  all indexed images share);
- it is a regular file with an image suffix.
The check is made on the opened descriptor (/proc/self/fd on Linux), so swapping the file
for a symlink between the check and the read does not help either.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable
from urllib.parse import quote

from ..images import is_image_path
from ..index.store import DATABASE
from .problems import RequestProblem

NO_SUCH_ITEM = "no such item in the index"
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


@dataclass(frozen=True)
class CatalogEntry:
    id: int
    path: str
    sha256: str | None


class Catalog:
    """Item lookups by id or path on a connection of its own, usable from any thread."""

    def __init__(self, index_dir: Path, roots: Iterable[Path] = ()):
        # Read-only: the service never writes to an index; `mmretrieve index` owns it.
        self._uri = f"file:{quote(str(Path(index_dir).resolve() / DATABASE))}?mode=ro"
        self._db = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        self._fixed_roots = tuple(os.path.realpath(root) for root in roots)

    def entry(self, item_id: str) -> CatalogEntry:
        if not item_id.isascii() or not item_id.isdigit() or len(item_id) > 18:
            raise RequestProblem(404, NO_SUCH_ITEM)  # anything but an id (a path, `..`) names nothing
        with self._lock:
            row = self._db.execute("SELECT id, path, sha256 FROM items WHERE id = ?", (int(item_id),)).fetchone()
        if row is None:
            raise RequestProblem(404, NO_SUCH_ITEM)
        return CatalogEntry(*row)

    def ids_for_paths(self, paths: list[str]) -> dict[str, int]:
        if not paths:
            return {}
        marks = ",".join("?" * len(paths))
        with self._lock:
            rows = self._db.execute(f"SELECT path, id FROM items WHERE path IN ({marks})", paths).fetchall()
        return dict(rows)

    def roots(self) -> tuple[str, ...]:
        """The folders files may come from: --root, else the indexed images' common folder."""
        if self._fixed_roots:
            return self._fixed_roots
        # The common folder of all paths is that of the first and last in sorted order, and the
        # UNIQUE index on path makes MIN and MAX two lookups, however large the index.
        with self._lock:
            low, high = self._db.execute("SELECT MIN(path), MAX(path) FROM items").fetchone()
        if low is None:
            return ()
        return (os.path.dirname(low) if low == high else os.path.commonpath([low, high]),)

    def reopen(self) -> None:
        """Follow the engine to a database that `index --rebuild` put in place of the old one."""
        fresh = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
        with self._lock:
            self._db, old = fresh, self._db
        old.close()

    def close(self) -> None:
        self._db.close()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_servable(recorded: str, roots: Iterable[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open an indexed file for reading if it may be served; else 403 (or 404 if it is gone)."""
    real = os.path.realpath(recorded)
    if real != recorded:
        raise RequestProblem(403, "this file has been replaced by a link (or moved) since it was indexed; "
                                  "re-run `mmretrieve index` to pick up the change")
    if not any(_inside(real, root) for root in roots):
        raise RequestProblem(403, "this file lies outside the folders this server shares")
    if not is_image_path(Path(real)):
        raise RequestProblem(403, "only image files are served")
    try:
        # O_NONBLOCK: a FIFO put in a file's place must not hold a thread until a writer comes.
        handle = open(real, "rb", opener=lambda p, flags: os.open(p, flags | _OPEN_FLAGS))
    except FileNotFoundError:
        raise RequestProblem(404, "this file no longer exists; re-run `mmretrieve index` to drop it") from None
    except OSError:
        raise RequestProblem(403, "this file cannot be opened") from None
    try:
        info = os.fstat(handle.fileno())
        opened = _opened_path(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or (opened is not None and opened != real):
            raise RequestProblem(403, "this file changed while it was being opened")
    except BaseException:
        handle.close()
        raise
    return handle, info


def _opened_path(fd: int) -> str | None:
    """The real path of an open descriptor where the OS tells it (Linux), else None."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
