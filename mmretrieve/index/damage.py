"""How a damaged index folder is reported: one sentence naming the folder, what is wrong and
the command that recovers it (`mmretrieve index PATH --index-dir IDX --rebuild`).

Damage is a file of the index that is missing, truncated or overwritten: a SQLite file that is
"not a database" or "malformed", a FAISS file faiss cannot parse, a published generation whose
vectors are gone. ``GuardedConnection`` turns SQLite's corruption errors into
``IndexDamagedError`` wherever a query meets them, so no caller sees a raw ``sqlite3`` traceback.
"""

from __future__ import annotations

import shlex
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from ..bundle import DEFAULT_MODEL  # what `index` uses when neither --model nor a readable manifest names one
from ..errors import IndexDamagedError
from ..formats import peek_json_object

# SQLite's primary result codes for a file that is not (or no longer) a valid database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def rebuild_command(folder: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """The `mmretrieve index ... --rebuild` line for ``folder``, with the indexed folder filled in
    when the manifest names exactly one (else ``PATH``), and its model when that is not the
    default (a rebuild whose manifest is too damaged to name it uses the default)."""
    folder = Path(folder)
    if manifest is None:
        manifest = peek_json_object(folder / "manifest.json")
    if not isinstance(manifest, dict):
        manifest = {}
    roots = manifest.get("roots") or []
    if manifest.get("modality") == "text":
        source = "--texts FILE"
    elif isinstance(roots, list) and len(roots) == 1 and isinstance(roots[0], str):
        source = shlex.quote(roots[0])
    else:
        source = "PATH"
    model = manifest.get("model")
    ref = model.get("ref") if isinstance(model, dict) else None
    named = f" --model {shlex.quote(ref)}" if isinstance(ref, str) and ref and ref != DEFAULT_MODEL else ""
    return f"mmretrieve index {source} --index-dir {shlex.quote(str(folder))}{named} --rebuild"


def relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it (how damage names a file of an index), else as it is."""
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def vectors_damaged(folder: str | Path, problem: str) -> IndexDamagedError:
    """The error for a damaged vector folder read on its own (it does not know its index folder:
    readers that do say ``index_damaged`` with this ``problem``)."""
    return IndexDamagedError(f"the vector index {folder} is damaged: {problem}; rebuild the index", problem)


def index_damaged(folder: str | Path, problem: str, manifest: dict[str, Any] | None = None) -> IndexDamagedError:
    """The error for a damaged index folder: what is wrong, and how to rebuild it."""
    return IndexDamagedError(f"the index {folder} is damaged: {problem}; rebuild it with "
                             f"`{rebuild_command(folder, manifest)}`", problem)


def is_corruption(exc: BaseException) -> bool:
    """True for SQLite's "file is not a database" and "database disk image is malformed"."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "not a database" in text or "malformed" in text


class _Guard:
    def __init__(self, folder: Path, database: Path):
        self.folder, self.database = folder, database

    def __enter__(self) -> None:
        return None

    def where(self) -> str:
        """The database, relative to the index folder when inside it."""
        return relative_to(self.database, self.folder)

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and is_corruption(exc):
            raise index_damaged(self.folder, f"{self.where()} cannot be read ({exc})") from exc
        return False


class GuardedCursor:
    """A cursor whose reads turn SQLite corruption into ``IndexDamagedError``."""

    def __init__(self, cursor: sqlite3.Cursor, guard: _Guard):
        self._cursor, self._guard = cursor, guard

    def fetchone(self):
        with self._guard:
            return self._cursor.fetchone()

    def fetchall(self):
        with self._guard:
            return self._cursor.fetchall()

    def fetchmany(self, size: int = 1):
        with self._guard:
            return self._cursor.fetchmany(size)

    def __iter__(self) -> Iterator:
        with self._guard:
            yield from self._cursor

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)


class GuardedConnection:
    """A ``sqlite3.Connection`` for an index's database (same methods); corruption met by any
    statement, or by reading its rows, becomes ``IndexDamagedError`` naming the index folder.

    A read-only connection checks that the database holds ``tables`` (an empty file, or another
    SQLite file, would otherwise fail every query with "no such table")."""

    def __init__(self, folder: str | Path, database: str | Path, readonly: bool = False,
                 tables: tuple[str, ...] = ("items",), manifest: dict[str, Any] | None = None, **connect: Any):
        database = Path(database)
        self._guard = _Guard(Path(folder), database)
        with self._guard:
            if readonly:  # a URI, so that SQLite never creates or writes the file
                self._db = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True, **connect)
            else:
                self._db = sqlite3.connect(database, **connect)
        if readonly:
            found = {name for (name,) in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [table for table in tables if table not in found]
            if missing:
                self._db.close()
                raise index_damaged(folder, f"{self._guard.where()} holds no {', '.join(missing)} "
                                            f"table{'s' if len(missing) > 1 else ''}", manifest)

    def execute(self, *args) -> GuardedCursor:
        with self._guard:
            return GuardedCursor(self._db.execute(*args), self._guard)

    def executemany(self, *args) -> GuardedCursor:
        with self._guard:
            return GuardedCursor(self._db.executemany(*args), self._guard)

    def executescript(self, script: str) -> GuardedCursor:
        with self._guard:
            return GuardedCursor(self._db.executescript(script), self._guard)

    def commit(self) -> None:
        with self._guard:
            self._db.commit()

    def __enter__(self) -> "GuardedConnection":
        self._db.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        with self._guard:
            return self._db.__exit__(kind, exc, tb)

    def __getattr__(self, name: str):
        return getattr(self._db, name)
