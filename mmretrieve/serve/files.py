"""Which files the service may send, and opening them so that what was checked is what is sent.

A client names an item by its integer id, never by a path; the path comes from the index
(as found: a link's own name, see index/README.md). The file is still refused unless, at the
moment it is opened,
- it is still an item of the index (it is looked up by id on every request);
- its real path (every symlink resolved, the file's own and its folders') lies inside one of
  the served roots: ``--root``, else the folders that were indexed into the index (its
  manifest's ``roots``, one per `mmretrieve index FOLDER`), else, for an index made before
  those were recorded, the folder that all indexed images share, but never a filesystem root.
  So a link pointing out of the photo folders (indexed with --follow-links), or a file swapped
  for such a link after indexing, is not sent unless --root names where it points;
- what the real path names is a regular file with an image suffix.
The check is made on the opened descriptor (/proc/self/fd on Linux), so swapping the file
for a symlink between the check and the read does not help either.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Iterable

from ..images import is_image_path
from ..index.catalogue import Catalogue, indexed_roots
from ..index.store import Item
from .problems import RequestProblem

NO_SUCH_ITEM = "no such item in the index"
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class Catalog:
    """The service's view of the image index's items (``index.catalogue``), with the folders files
    may come from; usable from any thread, following the engine to a new database."""

    def __init__(self, index_dir: Path, database: Path, roots: Iterable[Path] = (), manifest: dict | None = None):
        self._index_dir = Path(index_dir)
        self._lock = threading.Lock()  # held to use the catalogue, so `follow` never closes one in use
        self._fixed_roots = tuple(os.path.realpath(root) for root in roots)
        self._indexed_roots: tuple[str, ...] = ()
        self._database: tuple | None = None  # (path, device, inode) of the open database
        self._items: Catalogue | None = None
        self.follow(database, manifest or {})

    def entry(self, item_id: str) -> Item:
        if not item_id.isascii() or not item_id.isdigit() or len(item_id) > 18:
            raise RequestProblem(404, NO_SUCH_ITEM)  # anything but an id (a path, `..`) names nothing
        with self._lock:
            item = self._items.lookup(int(item_id))
        if item is None:
            raise RequestProblem(404, NO_SUCH_ITEM)
        return item

    def ids_for_paths(self, paths: list[str]) -> dict[str, int]:
        with self._lock:
            return self._items.ids_for_paths(paths)

    def roots(self) -> tuple[str, ...]:
        """The folders files may come from: --root, else the indexed folders, else (an index
        that does not record them) the indexed images' common folder unless that is ``/``."""
        if self._fixed_roots:
            return self._fixed_roots
        if self._indexed_roots:
            return self._indexed_roots
        with self._lock:
            common = self._items.common_folder()
        if common is None:
            return ()
        return () if os.path.dirname(common) == common else (common,)  # never a whole filesystem

    def follow(self, database: Path, manifest: dict) -> None:
        """Keep up with the engine: the database it reads (`index --rebuild` may have put a new
        file there, or the index moved to another one) and the folders the manifest records."""
        self._indexed_roots = indexed_roots(manifest)
        try:
            info = os.stat(database)
        except OSError:
            return  # gone between the engine's look and now: the next reload tells again
        identity = (str(database), info.st_dev, info.st_ino)
        if identity == self._database:
            return
        # Read-only: the service never writes to an index; `mmretrieve index` owns it. Guarded:
        # a damaged database is an IndexDamagedError (503), not a raw sqlite3 error (500).
        fresh = Catalogue(self._index_dir, database)
        with self._lock:
            self._items, old, self._database = fresh, self._items, identity
        if old is not None:
            old.close()

    def close(self) -> None:
        self._items.close()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_servable(recorded: str, roots: Iterable[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open an indexed file for reading if it may be served; else 403 (or 404 if it is gone)."""
    real = os.path.realpath(recorded)
    if not any(_inside(real, root) for root in roots):
        raise RequestProblem(403, "this file lies outside the folders this server shares (the indexed folders, "
                                  "or those given with --root)")
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
