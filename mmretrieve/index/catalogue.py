"""A read-only catalogue of an index's items, for a process that only looks them up (the HTTP
service sends an item's file by its id): the SQL against the index's schema stays in this
package. It has a connection of its own, opened read-only (it never creates or writes the
database) and usable from any thread; a damaged database is one ``IndexDamagedError`` sentence
(``damage.GuardedConnection``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable

from .damage import GuardedConnection
from .store import Item, database_path, ids_by_path, items_with_ids, path_bounds


class Catalogue:
    """Items of the database ``database`` of the index in ``index_dir`` (default: its current one)."""

    def __init__(self, index_dir: str | Path, database: str | Path | None = None):
        self.index_dir = Path(index_dir)
        self.database = Path(database) if database is not None else database_path(self.index_dir)
        self._lock = threading.Lock()
        self._db = GuardedConnection(self.index_dir, self.database.resolve(), readonly=True, check_same_thread=False)

    def lookup(self, item_id: int) -> Item | None:
        """The item with this id, or None."""
        with self._lock:
            return items_with_ids(self._db, [item_id]).get(int(item_id))

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """{path: id} for those of ``paths`` that are items."""
        with self._lock:
            return ids_by_path(self._db, paths)

    def common_folder(self) -> str | None:
        """The folder all items' paths share, or None for an empty index."""
        # The common folder of all paths is that of the first and last in sorted order, which
        # the index on paths finds with a lookup per folder, however many items there are.
        with self._lock:
            low, high = path_bounds(self._db)
        if low is None:
            return None
        return os.path.dirname(low) if low == high else os.path.commonpath([low, high])

    def close(self) -> None:
        self._db.close()


def indexed_roots(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The folders indexed into an index (its manifest's ``roots``, one per `mmretrieve index
    FOLDER`), real paths, in order; empty for an index made before they were recorded."""
    roots = manifest.get("roots") or ()
    return tuple(dict.fromkeys(os.path.realpath(root) for root in roots
                               if isinstance(root, str) and os.path.isabs(root)))
