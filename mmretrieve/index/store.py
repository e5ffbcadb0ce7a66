"""The index folder: a manifest naming the current data folder, which holds the SQLite metadata,
the embeddings and one FAISS folder per generation.

    manifest.json              format and versions, model, dimension, metric, index type, and
                               ``store``: the name of the current data folder
    data-NNNNNN/items.sqlite   items (folder, file name, size, mtime, sha256, width, height,
                               captions, the slot of their embedding), staged rows of a run not
                               yet published (with their embeddings), files that failed to read,
                               and the published generation, index type and options
    data-NNNNNN/embeddings-NNNNNN.f32  the published items' embeddings (``embeddings.py``)
    data-NNNNNN/vectors/gen-N/ the FAISS index of generation N

Publishing a generation writes its FAISS folder first, then appends the staged embeddings to
the embeddings file (synced), then commits one SQLite transaction that moves staged rows in,
drops vanished ones and records N; the manifest's copies of the generation and counts are a
cache rewritten after (and repaired by the next writer). Readers take the generation from
SQLite, so they see the last complete state and nothing else. A run that dies leaves its
staged rows behind, and the next run picks them up.

Every lookup a run makes per batch goes through an index of the tables (an item by id, or by
folder and file name), so staging a batch costs the same in an index of a thousand items and
of a million; whole-table reads happen once per run (``known_files``) or when FAISS is built
anew. Paths are stored as a folder (``folders``, each once) and a file name.

A new index and ``--rebuild`` fill a fresh data folder that no manifest names yet (it is
*pending*, described by its own ``pending.json``); one rename of ``manifest.json`` makes it
current, and the data folder it replaces is deleted after. Readers that still have the old
one open keep their file handles; ``IndexReader.refresh`` moves to the new one. An index
written before data folders existed (format 1, no ``store``) keeps its data in the index
folder itself and is read and updated there. A database in the layout before format 3 (paths
and embeddings in each row) is read as it is and migrated in place, in one transaction, by
the next process that writes to it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import InputError
from ..formats import read_folder_manifest
from .damage import GuardedConnection, index_damaged
from .embeddings import NAME as _EMBEDDINGS_NAME, EmbeddingFile, file_name, file_number, write_rows

FORMAT = "mmretrieve-index"
# 3: the database layout of SCHEMA (folders interned, embeddings in a file beside it);
# 2: data in the folder named by "store"; 1 (no "store"): in the index folder itself.
FORMAT_VERSION = 3
SCHEMA_VERSION = 3  # PRAGMA user_version of a database in SCHEMA's layout (0: the layout before)
MANIFEST = "manifest.json"
DATABASE = "items.sqlite"
VECTORS = "vectors"
PENDING = "pending.json"  # in a data folder being built: the manifest it will publish
LEGACY_STORE = "."  # a format-1 index keeps its data in the index folder itself
_DATA_NAME = re.compile(r"data-(\d{6})")

# The columns an item row has besides its id and path (folder + name).
_FIELDS = "size INTEGER, mtime_ns INTEGER, sha256 BLOB, width INTEGER, height INTEGER, captions TEXT, text TEXT, " \
          "image TEXT"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS folders (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, folder INTEGER NOT NULL, name TEXT NOT NULL, {_FIELDS}, slot INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS items_by_path ON items (folder, name);
CREATE TABLE IF NOT EXISTS staged (
    id INTEGER PRIMARY KEY, folder INTEGER NOT NULL, name TEXT NOT NULL, {_FIELDS}, embedding BLOB NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS staged_by_path ON staged (folder, name);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""
COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "captions", "text", "image")
_VALUES = COLUMNS[2:]  # stored as they are (sha256 as 32 bytes where it is a SHA-256 in hex)
# What a pending data folder must share with a run for that run to carry on filling it.
TABLES = ("items", "staged", "failures", "info")  # tables every layout has had
MODALITIES = ("image", "text")  # what an index's items are
_RESUME_KEYS = ("modality", "model", "embed_dim", "query_padding", "fusion", "building")
EMBEDDINGS_KEY = "embeddings"  # info: the embeddings file of the published items
# Compact the embeddings file when the rows no item names (replaced, removed) outnumber the
# items and this many: rewriting costs O(items) once per O(items) changes.
COMPACT_MIN_ROWS = 4096


@dataclass
class Item:
    id: int
    path: str
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    captions: list[str] | None = None  # captions known for an image item
    text: str | None = None  # the text of a text item
    image: str | None = None  # the image a text item describes

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def row_to_item(row: tuple) -> Item:
    """An Item from a row of ``COLUMNS``."""
    values = dict(zip(COLUMNS, row))
    values["captions"] = json.loads(values["captions"]) if values["captions"] else None
    values["sha256"] = _sha_text(values["sha256"])
    return Item(**values)


def _sha_blob(sha256: str | None) -> bytes | str | None:
    """A SHA-256 in hex as its 32 bytes (anything else as it is)."""
    if isinstance(sha256, str) and len(sha256) == 64:
        try:
            return bytes.fromhex(sha256)
        except ValueError:
            pass
    return sha256


def _sha_text(value: bytes | str | None) -> str | None:
    return value.hex() if isinstance(value, bytes) else value


def split_path(path: str) -> tuple[str, str]:
    """(folder with its trailing "/", file name): ``folder + name == path``."""
    cut = path.rfind("/") + 1
    return path[:cut], path[cut:]


def store_name(manifest: dict[str, Any], folder: Path) -> str:
    """The data folder a manifest names ("." for a format-1 index), checked to be one of ours."""
    name = manifest.get("store", LEGACY_STORE)
    if name != LEGACY_STORE and not (isinstance(name, str) and _DATA_NAME.fullmatch(name)):
        raise index_damaged(folder, f"{MANIFEST} names the data folder {name!r}, which is not one an index writes",
                            manifest)
    return name


def data_folder_names(folder: Path) -> list[str]:
    """The data folders (data-NNNNNN) in an index folder, oldest first."""
    return sorted(p.name for p in Path(folder).glob("data-*") if _DATA_NAME.fullmatch(p.name) and p.is_dir())


def database_path(folder: Path) -> Path:
    """The SQLite file of the index's current data folder."""
    folder = Path(folder)
    return folder / store_name(read_manifest(folder), folder) / DATABASE


# -- the item queries (IndexStore, the serve catalogue and verify use these) -----------------
_PARAMETERS = 500  # values per statement: SQLite bounds the parameters of one statement


def layout(db) -> int:
    """The database's layout: ``SCHEMA_VERSION``, or 0 for the layout before it (a path and an
    embedding in each row), which is read as it is until a writer migrates it."""
    return SCHEMA_VERSION if int(db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION else 0


def _item_select(db) -> str:
    if layout(db):
        return (f"SELECT i.id, f.path || i.name, {', '.join('i.' + c for c in _VALUES)} "
                f"FROM items i JOIN folders f ON f.id = i.folder")
    return f"SELECT {', '.join(COLUMNS)} FROM items i"


def items_with_ids(db, ids: Iterable[int]) -> dict[int, Item]:
    """{id: Item} of the published items among ``ids`` (``db``: a connection to an index database)."""
    ids = list(dict.fromkeys(int(i) for i in ids))
    select = _item_select(db)
    found: dict[int, Item] = {}
    for start in range(0, len(ids), _PARAMETERS):
        chunk = ids[start:start + _PARAMETERS]
        rows = db.execute(f"{select} WHERE i.id IN ({','.join('?' * len(chunk))})", chunk)
        found.update((row[0], row_to_item(row)) for row in rows)
    return found


def ids_by_path(db, paths: Iterable[str], table: str = "items") -> dict[str, int]:
    """{path: id} of the published items (or ``table``'s rows) among ``paths``: one indexed
    lookup per path, in statements of a few hundred."""
    paths = list(dict.fromkeys(paths))
    found: dict[str, int] = {}
    if not layout(db):
        for start in range(0, len(paths), _PARAMETERS):
            chunk = paths[start:start + _PARAMETERS]
            found.update(db.execute(f"SELECT path, id FROM {table} WHERE path IN ({','.join('?' * len(chunk))})",
                                    chunk))
        return found
    pairs = _PARAMETERS // 2
    for start in range(0, len(paths), pairs):
        chunk = [part for path in paths[start:start + pairs] for part in split_path(path)]
        wanted = ",".join(["(?, ?)"] * (len(chunk) // 2))
        found.update(db.execute(
            f"WITH wanted(folder, name) AS (VALUES {wanted}) "
            f"SELECT w.folder || w.name, t.id FROM wanted w JOIN folders f ON f.path = w.folder "
            f"JOIN {table} t ON t.folder = f.id AND t.name = w.name", chunk))
    return found


def path_bounds(db) -> tuple[str | None, str | None]:
    """The smallest and largest item path (None, None for an empty index), from the index on
    paths: one lookup per folder, however many items."""
    if not layout(db):
        return tuple(db.execute("SELECT MIN(path), MAX(path) FROM items").fetchone())
    # Within a folder the smallest path has the smallest name; across folders, compare those.
    return tuple(db.execute(
        "SELECT MIN(f.path || (SELECT MIN(name) FROM items WHERE folder = f.id)), "
        "MAX(f.path || (SELECT MAX(name) FROM items WHERE folder = f.id)) FROM folders f").fetchone())


class IndexStore:
    """Read and write access to one data folder of an index (writers hold the WriterLock).

    ``readonly`` opens the database read-only (for readers); ``pending`` marks a data folder
    no manifest names yet: its manifest goes to ``pending.json`` until ``activate``.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], readonly: bool = False, pending: bool = False):
        self.folder = Path(folder)
        self.manifest = manifest
        self.readonly = readonly
        self.pending = pending
        self.replaces: str | None = None  # for a pending store: the data folder it will replace, if any
        self.fresh = False  # created by this process (not resumed)
        self.reindex: str | None = None  # another --index-type: the next publish rebuilds FAISS as this
        self.reindex_from: str | None = None  # the FAISS index kind published before that switch
        self._data_folder = self.folder / store_name(manifest, self.folder)
        database = self._data_folder / DATABASE
        if readonly:
            if not database.is_file():
                raise index_damaged(self.folder, f"{database.relative_to(self.folder)}, named by its manifest, "
                                                 f"is missing", manifest)
            self.db = GuardedConnection(self.folder, database, readonly=True, tables=TABLES, manifest=manifest,
                                        timeout=30)
            return
        self.db = GuardedConnection(self.folder, database, timeout=30)
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "items" not in tables:  # a new database: pages freed by publishing go back to the system
            self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self.db.execute("PRAGMA synchronous=NORMAL")
        if "items" in tables and not layout(self.db):
            self._migrate()
        else:
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.manifest["format_version"] = FORMAT_VERSION  # the layout it has now (written with the manifest)
        self._remove_stray_embeddings()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, manifest: dict[str, Any], replaces: str | None = None,
               generation: int = 0) -> "IndexStore":
        """A pending store in a fresh data folder; ``activate`` (on publishing) makes it current.
        ``generation`` continues the numbering of the index it replaces."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in folder.iterdir() if (m := _DATA_NAME.fullmatch(p.name))]
        name = f"data-{max(taken, default=0) + 1:06d}"
        (folder / name).mkdir()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmretrieve_version": __version__,
                    "created": _now(), **manifest, "store": name, "generation": generation,
                    "counts": {"items": 0, "failures": 0}}
        store = cls(folder, manifest, pending=True)
        store.replaces, store.fresh = replaces, True
        if generation:
            with store.db:
                store.db.execute("INSERT OR REPLACE INTO info VALUES ('generation', ?)", (str(generation),))
        store.write_manifest()
        return store

    @classmethod
    def resume(cls, folder: Path, manifest: dict[str, Any], replaces: str | None = None) -> "IndexStore | None":
        """The pending data folder a killed run left for this same build (``manifest`` as ``create``
        gets it), to go on filling; None when there is none."""
        folder = Path(folder)
        for data in sorted(folder.glob("data-*"), reverse=True):
            try:
                pending = json.loads((data / PENDING).read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(pending, dict) or data.name != pending.get("store") or not (data / DATABASE).is_file():
                continue
            if data.name == replaces:  # the live folder (a run killed as an older version activated it)
                (data / PENDING).unlink(missing_ok=True)
                continue
            if all(pending.get(key) == manifest.get(key) for key in _RESUME_KEYS):
                store = cls(folder, {**pending, **manifest, "store": data.name,
                                     "generation": pending.get("generation", 0)}, pending=True)
                store.replaces = replaces
                store.write_manifest()
                return store
        return None

    @classmethod
    def open(cls, folder: Path, readonly: bool = False) -> "IndexStore":
        return cls(Path(folder), read_manifest(folder), readonly=readonly)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def data_folder(self) -> Path:
        """Where this store's database and vectors live (the index folder itself for format 1)."""
        return self._data_folder

    @property
    def name(self) -> str:
        return store_name(self.manifest, self.folder)

    def activate(self) -> None:
        """Make a pending store current: one atomic rewrite of manifest.json. The data folder it
        replaces is left for ``remove_stray_data`` (readers may still have it open)."""
        if not self.pending:
            return
        self.manifest.setdefault("updated", _now())
        self.manifest.pop("building", None)  # what the pending folder was filled from: only for resuming
        # pending.json goes first: a kill between the two steps then leaves a folder no manifest
        # names and nothing marks as resumable (removed by the next run), never a live folder that
        # a later --rebuild would "resume".
        (self.data_folder / PENDING).unlink(missing_ok=True)
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=2))
        self.pending = False

    def discard(self) -> None:
        """Delete a pending store's data folder (a run that failed before it made anything worth keeping)."""
        if self.pending and self.name != LEGACY_STORE:
            self.close()
            shutil.rmtree(self.data_folder, ignore_errors=True)

    # -- generations -----------------------------------------------------------------------
    def _info(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def generation(self) -> int:
        value = self._info("generation")
        return int(value) if value else 0

    def published_index_type(self) -> tuple[str | None, dict[str, Any] | None]:
        """The FAISS index kind and options of the published generation, as SQLite recorded them
        (an index from before this was recorded: the manifest's)."""
        kind, options = self._info("index_type"), self._info("index_options")
        if kind is None:
            return self.manifest.get("index_type"), self.manifest.get("index_options")
        return kind, json.loads(options) if options else {}

    def counts(self) -> dict[str, int]:
        """What the index holds now, from SQLite (the manifest's copy is a cache): published items,
        files that failed to read, and the published generation. Safe on a read-only store."""
        return {"items": self.count(), "failures": self.count("failures"), "generation": self.generation}

    def vectors_folder(self, generation: int | None = None) -> Path:
        return self.data_folder / VECTORS / f"gen-{self.generation if generation is None else generation:06d}"

    def remove_stale_vectors(self) -> None:
        """Drop generation folders other than the published one (old, or left by a killed run)."""
        keep = self.vectors_folder().name
        for folder in (self.data_folder / VECTORS).glob("gen-*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def _path_from(self, table: str) -> tuple[str, str]:
        """(the expression of a row's full path, the FROM clause) for rows ``t`` of ``table``, in either layout."""
        if layout(self.db):
            return "f.path || t.name", f"{table} t JOIN folders f ON f.id = t.folder"
        return "t.path", f"{table} t"

    def _select_paths(self, table: str, columns: str) -> str:
        """SELECT of each row's full path and ``columns`` (of alias ``t``)."""
        path, source = self._path_from(table)
        return f"SELECT {path}, {columns} FROM {source}"

    def known_files(self) -> dict[str, tuple[int, int, str | None]]:
        """Published and staged files: {path: (size, mtime_ns, sha256)}; staged wins (newer)."""
        known: dict[str, tuple[int, int, str | None]] = {}
        for table in ("items", "staged"):
            for path, size, mtime_ns, sha256 in self.db.execute(
                    self._select_paths(table, "t.size, t.mtime_ns, t.sha256")):
                known[path] = (size, mtime_ns, _sha_text(sha256))
        return known

    def captions_by_path(self) -> dict[str, list[str] | None]:
        """Published and staged items' captions (staged wins, as in ``known_files``)."""
        stored: dict[str, list[str] | None] = {}
        for table in ("items", "staged"):
            for path, captions in self.db.execute(self._select_paths(table, "t.captions")):
                stored[path] = json.loads(captions) if captions else None
        return stored

    def failed_files(self) -> dict[str, tuple[int, int, str]]:
        return {p: (s, m, r) for p, s, m, r in self.db.execute("SELECT path, size, mtime_ns, reason FROM failures")}

    def items_by_id(self, ids: Iterable[int]) -> dict[int, Item]:
        return items_with_ids(self.db, ids)

    def item_ids_for_paths(self, paths: Iterable[str]) -> list[int]:
        return list(ids_by_path(self.db, paths).values())

    def embedding_file(self) -> EmbeddingFile:
        """The file that holds the published items' embeddings (format 3)."""
        name = self._info(EMBEDDINGS_KEY) or file_name(1)
        return EmbeddingFile(self.data_folder / name, int(self.manifest["embed_dim"]))

    def all_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Every published item's id and embedding, by id."""
        if not layout(self.db):
            return self._embeddings("items")
        ids, slots = self._slots("SELECT id, slot FROM items ORDER BY id")
        return ids, self._read_embeddings(slots)

    def embeddings_of(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """{id: embedding} of the published items among ``ids`` (one that is not ``embed_dim``
        float32s, in an index from before format 3, is left out)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        dim = int(self.manifest["embed_dim"])
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), _PARAMETERS):
            chunk = ids[start:start + _PARAMETERS]
            marks = ",".join("?" * len(chunk))
            if layout(self.db):
                found, slots = self._slots(f"SELECT id, slot FROM items WHERE id IN ({marks}) ORDER BY id", chunk)
                out.update(zip(found.tolist(), self._read_embeddings(slots)))
            else:
                for id_, blob in self.db.execute(f"SELECT id, embedding FROM items WHERE id IN ({marks})", chunk):
                    if len(blob) == 4 * dim:
                        out[id_] = np.frombuffer(blob, dtype=np.float32)
        return out

    def embedding_problems(self) -> tuple[int, list[str]]:
        """(embeddings stored, what is wrong with them): every staged embedding is ``embed_dim``
        float32s, and every published item names a row of the embeddings file, a row of its own."""
        dim = int(self.manifest["embed_dim"])
        expected = 4 * dim
        problems = []
        tables = ("staged",) if layout(self.db) else ("items", "staged")
        wrong, example = 0, None
        for table in tables:
            path, source = self._path_from(table)
            count, path = self.db.execute(f"SELECT COUNT(*), MIN({path}) FROM {source} WHERE length(t.embedding) != ?",
                                          (expected,)).fetchone()
            wrong += count
            example = example or path
        total = self.count() + self.count("staged")
        if wrong:
            problems.append(f"{wrong:,} of {total:,} stored embeddings are not {expected} bytes ({dim} float32s), "
                            f"e.g. the one of {example}")
        if layout(self.db):
            vectors = self.embedding_file()
            rows = vectors.rows
            outside, first = self.db.execute("SELECT COUNT(*), MIN(id) FROM items WHERE slot < 0 OR slot >= ?",
                                             (rows,)).fetchone()
            if outside:
                problems.append(f"{outside:,} items name rows past the end of {vectors.path.name}, which holds "
                                f"{rows:,} (e.g. item {first})")
            shared = self.db.execute("SELECT COUNT(*) FROM (SELECT slot FROM items GROUP BY slot "
                                     "HAVING COUNT(*) > 1)").fetchone()[0]
            if shared:
                problems.append(f"{shared:,} rows of {vectors.path.name} are named by more than one item")
        return total, problems

    def _slots(self, query: str, parameters: Iterable = ()) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array(self.db.execute(query, list(parameters)).fetchall(), dtype=np.int64).reshape(-1, 2)
        return rows[:, 0], rows[:, 1]

    def _read_embeddings(self, slots: np.ndarray) -> np.ndarray:
        vectors = self.embedding_file()
        try:
            return vectors.read(slots)
        except (OSError, ValueError) as exc:
            problem = f"{vectors.path.name} is missing" if isinstance(exc, FileNotFoundError) else str(exc)
            raise index_damaged(self.folder, f"the stored embeddings cannot be read ({problem})",
                                self.manifest) from exc

    def embedding_shards(self, rows: int, exclude: Iterable[int] = ()) -> list["EmbeddingShard"]:
        """The published embeddings but ``exclude``, as shards of ``rows`` ids each that read their
        vectors only when loaded, so a rebuild holds one shard of floats at a time."""
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)
        ids = ids[~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))]
        return [EmbeddingShard(self, ids[start:start + rows]) for start in range(0, len(ids), rows)]

    def _embeddings(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids and embeddings stored in the rows of ``table`` (staged rows; published ones before format 3)."""
        dim = int(self.manifest["embed_dim"])
        rows = self.db.execute(f"SELECT id, embedding FROM {table} ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vectors

    def count(self, table: str = "items") -> int:
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # -- writing ---------------------------------------------------------------------------
    def next_ids(self, count: int) -> list[int]:
        # MAX of an INTEGER PRIMARY KEY is one step down its b-tree (a UNION of the two is not).
        top = max(self.db.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0] or 0 for table in ("items", "staged"))
        return list(range(top + 1, top + 1 + count))

    def _folder_ids(self, folders: Iterable[str]) -> dict[str, int]:
        """{folder: id}, adding the folders not recorded yet (call inside the transaction that uses them)."""
        folders = list(dict.fromkeys(folders))
        found: dict[str, int] = {}
        for start in range(0, len(folders), _PARAMETERS):
            chunk = folders[start:start + _PARAMETERS]
            found.update(self.db.execute(f"SELECT path, id FROM folders WHERE path IN ({','.join('?' * len(chunk))})",
                                         chunk))
        for folder in folders:
            if folder not in found:
                found[folder] = self.db.execute("INSERT INTO folders (path) VALUES (?)", (folder,)).lastrowid
        return found

    def stage(self, items: list[Item], embeddings: np.ndarray) -> None:
        """Record embedded items (durably) without publishing them. Looks up only these items'
        paths, through the index on them, so a batch costs the same in a small and a large index."""
        if not items:
            return
        # A changed file keeps its id, so the FAISS update is a replace.
        existing = ids_by_path(self.db, [item.path for item in items])
        fresh = iter(self.next_ids(len(items)))
        for item in items:
            item.id = existing.get(item.path) or next(fresh)
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        with self.db:
            folders = self._folder_ids(split_path(item.path)[0] for item in items)
            rows = []
            for item, vector in zip(items, vectors):
                folder, name = split_path(item.path)
                rows.append((item.id, folders[folder], name, item.size, item.mtime_ns, _sha_blob(item.sha256),
                             item.width, item.height, json.dumps(item.captions) if item.captions else None,
                             item.text, item.image, vector.tobytes()))
            self.db.executemany(f"INSERT OR REPLACE INTO staged (id, folder, name, {', '.join(_VALUES)}, embedding) "
                                f"VALUES ({', '.join('?' * (len(_VALUES) + 4))})", rows)
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(i.path,) for i in items])

    def record_failures(self, failures: list[tuple[str, int, int, str]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", failures)

    def forget_failures(self, paths: Iterable[str]) -> None:
        """Failed files that are gone (or no longer wanted): they are not failures any more."""
        with self.db:
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])

    # A row of ``table`` by path: the folder's id through its index, then (folder, name) through the table's.
    _BY_PATH = "folder = (SELECT id FROM folders WHERE path = ?) AND name = ?"

    def touch(self, updates: list[tuple[int, int, str]]) -> None:
        """Same content, new mtime: (size, mtime_ns, path)."""
        with self.db:
            self.db.executemany(f"UPDATE items SET size = ?, mtime_ns = ? WHERE {self._BY_PATH}",
                                [(size, mtime_ns, *split_path(path)) for size, mtime_ns, path in updates])

    def set_captions(self, updates: list[tuple[list[str] | None, str]]) -> None:
        """New captions for indexed items whose vectors do not depend on them: (captions, path)."""
        with self.db:
            for table in ("items", "staged"):
                self.db.executemany(f"UPDATE {table} SET captions = ? WHERE {self._BY_PATH}",
                                    [(json.dumps(c) if c else None, *split_path(p)) for c, p in updates])

    def staged(self) -> tuple[np.ndarray, np.ndarray]:
        return self._embeddings("staged")

    def publish(self, generation: int, removed_paths: list[str], index_type: str, index_options: dict[str, Any],
                requested_index_type: str | None = None,
                staged: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Make generation N current: the staged embeddings appended to the embeddings file
        (synced), then staged rows in, removed paths out, N and its FAISS index type recorded,
        in one transaction; then the manifest's cached copies follow. Costs what changed: no
        statement reads the published rows that stay as they are. ``staged``: what ``staged()``
        returns, when the caller has just read it (the FAISS update did), so it is read once."""
        requested = requested_index_type or self.manifest.get("requested_index_type", "auto")
        staged_ids, staged_vectors = staged if staged is not None else self.staged()
        vectors = self.embedding_file()
        first = vectors.append(staged_vectors) if len(staged_ids) else 0
        with self.db:
            # Staged rows in id order take the rows appended for them, from ``first`` on.
            self.db.execute(f"INSERT OR REPLACE INTO items (id, folder, name, {', '.join(_VALUES)}, slot) "
                            f"SELECT id, folder, name, {', '.join(_VALUES)}, "
                            f"? + row_number() OVER (ORDER BY id) - 1 FROM staged ORDER BY id", (first,))
            self.db.execute("DELETE FROM staged")
            self.db.executemany(f"DELETE FROM items WHERE {self._BY_PATH}", [split_path(p) for p in removed_paths])
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in removed_paths])
            self.db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                                [("generation", str(generation)), ("index_type", index_type),
                                 ("index_options", json.dumps(index_options)), ("requested_index_type", requested),
                                 (EMBEDDINGS_KEY, vectors.path.name)])
        self._compact_embeddings()
        # The pages the staged rows took go back to the system. Each page freed is a step of the
        # pragma, and execute() takes only the first step of a statement without columns.
        self.db.executescript("PRAGMA incremental_vacuum;")
        self.manifest["updated"] = _now()
        self.sync_manifest(force=True)

    def _compact_embeddings(self) -> None:
        """Rewrite the embeddings file without the rows no item names, once they outnumber the
        items (and ``COMPACT_MIN_ROWS``): a new file, synced, then one transaction that renumbers
        the slots and names it. The old file stays until the next writer opens the index
        (``_remove_stray_embeddings``), so a reader without the lock (``info --verify``) that read
        its name before the commit still finds it whole."""
        old = self.embedding_file()
        live = self.count()
        if old.rows - live <= max(live, COMPACT_MIN_ROWS):
            return
        ids, slots = self._slots("SELECT id, slot FROM items ORDER BY slot")
        new = self.data_folder / file_name(file_number(old.path.name) + 1)
        chunk = 65_536
        write_rows(new, (old.read(slots[start:start + chunk]) for start in range(0, len(slots), chunk)), old.dim)
        with self.db:
            self.db.executemany("UPDATE items SET slot = ? WHERE id = ?", zip(range(len(ids)), ids.tolist()))
            self.db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (EMBEDDINGS_KEY, new.name))

    def _remove_stray_embeddings(self) -> None:
        """Embeddings files the database does not name (a compaction or migration killed midway)."""
        keep = self.embedding_file().path.name
        for path in self.data_folder.glob("embeddings-*.f32"):
            if path.name != keep and _EMBEDDINGS_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)

    def _migrate(self) -> None:
        """Bring a database of the layout before format 3 (a path and an embedding in every row)
        to SCHEMA's, in place: the published embeddings are copied to a new embeddings file
        (synced) first, then one transaction rebuilds the tables, so a kill at any point leaves
        either the old layout, whole, or the new one; then VACUUM returns the freed pages."""
        dim = int(self.manifest["embed_dim"])
        self.db.commit()
        for path in self.data_folder.glob("embeddings-*.f32"):  # left by a migration killed before its commit
            if _EMBEDDINGS_NAME.fullmatch(path.name):
                path.unlink()
        target = self.data_folder / file_name(1)

        def published():
            cursor = self.db.execute("SELECT id, path, embedding FROM items ORDER BY id")
            while rows := cursor.fetchmany(10_000):
                wrong = next((path for _, path, blob in rows if len(blob) != 4 * dim), None)
                if wrong is not None:
                    raise index_damaged(self.folder, f"the stored embedding of {wrong} is not {dim} float32s",
                                        self.manifest)
                yield np.frombuffer(b"".join(blob for _, _, blob in rows), dtype=np.float32).reshape(-1, dim)

        write_rows(target, published(), dim)
        columns = ", ".join(_VALUES)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for table in ("items", "staged"):
                self.db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
            for statement in SCHEMA.strip().split(";\n"):
                if "failures" not in statement and "info" not in statement:
                    self.db.execute(statement)
            for table, last in (("items", "slot"), ("staged", "embedding")):
                cursor = self.db.execute(f"SELECT id, path, {columns}, "
                                         f"{'embedding' if table == 'staged' else 'NULL'} FROM old_{table} ORDER BY id")
                slot = 0
                while rows := cursor.fetchmany(10_000):
                    folders = self._folder_ids(split_path(row[1])[0] for row in rows)
                    converted = []
                    for row in rows:
                        folder, name = split_path(row[1])
                        values = list(row[2:-1])
                        values[_VALUES.index("sha256")] = _sha_blob(values[_VALUES.index("sha256")])
                        last_value = slot if table == "items" else row[-1]  # published: the row written above
                        converted.append((row[0], folders[folder], name, *values, last_value))
                        slot += 1
                    self.db.executemany(f"INSERT INTO {table} (id, folder, name, {columns}, {last}) "
                                        f"VALUES ({', '.join('?' * (len(_VALUES) + 4))})", converted)
                self.db.execute(f"DROP TABLE old_{table}")
            self.db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (EMBEDDINGS_KEY, target.name))
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect with the VACUUM
        self.db.execute("VACUUM")
        self.manifest["format_version"] = FORMAT_VERSION
        self.write_manifest()  # readers of an older mmretrieve are told to upgrade, not that it is damaged

    def set_requested_index_type(self, requested: str) -> None:
        """Record the index type asked for, without a new generation (the published one already is it)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO info VALUES ('requested_index_type', ?)", (requested,))
        self.manifest["requested_index_type"] = requested
        self.write_manifest()

    def sync_manifest(self, force: bool = False) -> bool:
        """Bring the manifest's cached generation, counts and index type in line with SQLite (a
        writer does this on opening, so a kill between a commit and the manifest rewrite heals on
        the next run); True if it was rewritten."""
        counts = self.counts()
        kind, options = self.published_index_type()
        cached = {"generation": counts.pop("generation"), "counts": counts}
        if kind is not None:
            cached.update(index_type=kind, index_options=options)
        requested = self._info("requested_index_type")
        if requested is not None:
            cached["requested_index_type"] = requested
        stale = any(self.manifest.get(key) != value for key, value in cached.items())
        self.manifest.update(cached)
        if stale or force:
            self.write_manifest()
        return stale

    def write_manifest(self) -> None:
        """Rewrite manifest.json (pending.json in the data folder of a pending store)."""
        target = self.data_folder / PENDING if self.pending else self.folder / MANIFEST
        write_text_atomic(target, json.dumps(self.manifest, indent=2))


@dataclass(frozen=True)
class EmbeddingShard:
    """The published embeddings of ``ids`` (ascending), read by ``load``."""

    store: IndexStore
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        wanted, store = self.ids, self.store
        if not len(wanted):
            return wanted, np.empty((0, int(store.manifest["embed_dim"])), dtype=np.float32)
        bounds = (int(wanted[0]), int(wanted[-1]))
        if not layout(store.db):
            rows = store.db.execute("SELECT id, embedding FROM items WHERE id BETWEEN ? AND ? ORDER BY id",
                                    bounds).fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            keep = np.isin(ids, wanted)
            vectors = np.frombuffer(b"".join(r[1] for r, k in zip(rows, keep) if k), dtype=np.float32)
            return ids[keep], vectors.reshape(int(keep.sum()), int(store.manifest["embed_dim"]))
        ids, slots = store._slots("SELECT id, slot FROM items WHERE id BETWEEN ? AND ? ORDER BY id", bounds)
        keep = np.isin(ids, wanted)
        return ids[keep], store._read_embeddings(slots[keep])


def remove_stray_data(folder: Path, keep: Iterable[str]) -> list[str]:
    """Delete the data folders of an index that are not in ``keep`` (replaced by a rebuild, or
    left by a killed one), and format-1 data in the index folder itself unless "." is kept.
    Only a writer holding the lock may call this. Returns what was removed."""
    folder, keep = Path(folder), set(keep)
    removed = []
    for data in folder.glob("data-*"):
        if data.name not in keep and _DATA_NAME.fullmatch(data.name) and data.is_dir() and _ours(data):
            shutil.rmtree(data, ignore_errors=True)
            removed.append(data.name)
    if LEGACY_STORE not in keep:
        legacy = [folder / name for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm")] + \
            [path for path in folder.glob("embeddings-*.f32") if _EMBEDDINGS_NAME.fullmatch(path.name)]
        if any(path.exists() for path in legacy) or (folder / VECTORS).is_dir():
            for path in legacy:
                path.unlink(missing_ok=True)
            shutil.rmtree(folder / VECTORS, ignore_errors=True)
            removed.append(LEGACY_STORE)
    return removed


def _ours(data: Path) -> bool:
    """A data folder an index wrote (a database, a pending build, or still empty), not a user's
    folder that happens to be named like one."""
    return (data / DATABASE).exists() or (data / PENDING).exists() or not any(data.iterdir())


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    manifest = read_folder_manifest(
        folder, MANIFEST, FORMAT, FORMAT_VERSION, "index", InputError,
        missing=f"{folder} holds no index (no {MANIFEST}); build one with `mmretrieve index PATH`",
        damaged=lambda problem: index_damaged(folder, problem, {}))
    missing = [key for key, kind in (("modality", str), ("model", dict), ("embed_dim", int))
               if not isinstance(manifest.get(key), kind)]
    if missing or manifest["modality"] not in MODALITIES:
        raise index_damaged(folder, f"{MANIFEST} lacks {', '.join(missing)}" if missing else
                            f"{MANIFEST} names the modality {manifest['modality']!r}", manifest)
    store_name(manifest, folder)
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
