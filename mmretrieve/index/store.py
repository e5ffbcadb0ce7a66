"""The index folder: a manifest naming the current data folder, which holds the SQLite metadata
and embeddings and one FAISS folder per generation.

    manifest.json              format and versions, model, dimension, metric, index type, and
                               ``store``: the name of the current data folder
    data-NNNNNN/items.sqlite   items (path, size, mtime, sha256, width, height, captions, embedding),
                               staged rows of a run not yet published, files that failed to read,
                               and the published generation, index type and options
    data-NNNNNN/vectors/gen-N/ the FAISS index of generation N

Publishing a generation writes its FAISS folder first, then commits one SQLite transaction
that moves staged rows in, drops vanished ones and records N; the manifest's copies of the
generation and counts are a cache rewritten after (and repaired by the next writer). Readers
take the generation from SQLite, so they see the last complete state and nothing else. A run
that dies leaves its staged rows behind, and the next run picks them up.

A new index and ``--rebuild`` fill a fresh data folder that no manifest names yet (it is
*pending*, described by its own ``pending.json``); one rename of ``manifest.json`` makes it
current, and the data folder it replaces is deleted after. Readers that still have the old
one open keep their file handles; ``IndexReader.refresh`` moves to the new one. An index
written before data folders existed (format 1, no ``store``) keeps its data in the index
folder itself and is read and updated there.
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

FORMAT = "mmretrieve-index"
FORMAT_VERSION = 2  # 2: data in the folder named by "store"; 1 (no "store"): in the index folder itself
MANIFEST = "manifest.json"
DATABASE = "items.sqlite"
VECTORS = "vectors"
PENDING = "pending.json"  # in a data folder being built: the manifest it will publish
LEGACY_STORE = "."  # a format-1 index keeps its data in the index folder itself
_DATA_NAME = re.compile(r"data-(\d{6})")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER, captions TEXT, text TEXT, image TEXT, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS staged (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER, captions TEXT, text TEXT, image TEXT, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT);
"""
COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "captions", "text", "image")
# What a pending data folder must share with a run for that run to carry on filling it.
TABLES = ("items", "staged", "failures", "info")  # what SCHEMA makes; every index has had them all
MODALITIES = ("image", "text")  # what an index's items are
_RESUME_KEYS = ("modality", "model", "embed_dim", "query_padding", "fusion", "building")


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
    return Item(**values)


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


_PARAMETERS = 500  # values per IN (...): SQLite bounds the parameters of one statement


def items_with_ids(db, ids: Iterable[int]) -> dict[int, Item]:
    """{id: Item} of the published items among ``ids`` (``db``: a connection to an index database)."""
    ids = list(dict.fromkeys(int(i) for i in ids))
    found: dict[int, Item] = {}
    for start in range(0, len(ids), _PARAMETERS):
        chunk = ids[start:start + _PARAMETERS]
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        found.update((row[0], row_to_item(row)) for row in rows)
    return found


def ids_by_path(db, paths: Iterable[str]) -> dict[str, int]:
    """{path: id} of the published items among ``paths``."""
    paths = list(dict.fromkeys(paths))
    found: dict[str, int] = {}
    for start in range(0, len(paths), _PARAMETERS):
        chunk = paths[start:start + _PARAMETERS]
        found.update(db.execute(f"SELECT path, id FROM items WHERE path IN ({','.join('?' * len(chunk))})", chunk))
    return found


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
        self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self.db.execute("PRAGMA synchronous=NORMAL")

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
    def known_files(self) -> dict[str, tuple[int, int, str | None]]:
        """Published and staged files: {path: (size, mtime_ns, sha256)}; staged wins (newer)."""
        known = {p: (s, m, h) for p, s, m, h in self.db.execute("SELECT path, size, mtime_ns, sha256 FROM items")}
        known.update({p: (s, m, h) for p, s, m, h in self.db.execute("SELECT path, size, mtime_ns, sha256 FROM staged")})
        return known

    def captions_by_path(self) -> dict[str, list[str] | None]:
        """Published and staged items' captions (staged wins, as in ``known_files``)."""
        stored: dict[str, list[str] | None] = {}
        for table in ("items", "staged"):
            for path, captions in self.db.execute(f"SELECT path, captions FROM {table}"):
                stored[path] = json.loads(captions) if captions else None
        return stored

    def failed_files(self) -> dict[str, tuple[int, int, str]]:
        return {p: (s, m, r) for p, s, m, r in self.db.execute("SELECT path, size, mtime_ns, reason FROM failures")}

    def items_by_id(self, ids: Iterable[int]) -> dict[int, Item]:
        return items_with_ids(self.db, ids)

    def item_ids_for_paths(self, paths: Iterable[str]) -> list[int]:
        return list(ids_by_path(self.db, paths).values())

    def all_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self._embeddings("items")

    def embedding_shards(self, rows: int, exclude: Iterable[int] = ()) -> list["EmbeddingShard"]:
        """The published embeddings but ``exclude``, as shards of ``rows`` ids each that read their
        vectors from SQLite only when loaded, so a rebuild holds one shard of floats at a time."""
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)
        ids = ids[~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))]
        dim = int(self.manifest["embed_dim"])
        return [EmbeddingShard(self.db, dim, ids[start:start + rows]) for start in range(0, len(ids), rows)]

    def _embeddings(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        dim = int(self.manifest["embed_dim"])
        rows = self.db.execute(f"SELECT id, embedding FROM {table} ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vectors

    def count(self, table: str = "items") -> int:
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # -- writing ---------------------------------------------------------------------------
    def next_ids(self, count: int) -> list[int]:
        row = self.db.execute("SELECT MAX(id) FROM (SELECT id FROM items UNION ALL SELECT id FROM staged)").fetchone()
        start = (row[0] or 0) + 1
        return list(range(start, start + count))

    def stage(self, items: list[Item], embeddings: np.ndarray) -> None:
        """Record embedded items (durably) without publishing them."""
        existing = {path: id_ for path, id_ in self.db.execute("SELECT path, id FROM items")} if items else {}
        fresh = iter(self.next_ids(len(items)))
        rows = []
        for item, vector in zip(items, embeddings.astype(np.float32)):
            # A changed file keeps its id, so the FAISS update is a replace.
            item.id = existing.get(item.path) or next(fresh)
            rows.append((item.id, item.path, item.size, item.mtime_ns, item.sha256, item.width, item.height,
                         json.dumps(item.captions) if item.captions else None, item.text, item.image,
                         vector.tobytes()))
        with self.db:
            self.db.executemany(f"INSERT OR REPLACE INTO staged ({', '.join(COLUMNS)}, embedding) "
                                f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})", rows)
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(i.path,) for i in items])

    def record_failures(self, failures: list[tuple[str, int, int, str]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", failures)

    def forget_failures(self, paths: Iterable[str]) -> None:
        """Failed files that are gone (or no longer wanted): they are not failures any more."""
        with self.db:
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in paths])

    def touch(self, updates: list[tuple[int, int, str]]) -> None:
        """Same content, new mtime: (size, mtime_ns, path)."""
        with self.db:
            self.db.executemany("UPDATE items SET size = ?, mtime_ns = ? WHERE path = ?", updates)

    def set_captions(self, updates: list[tuple[list[str] | None, str]]) -> None:
        """New captions for indexed items whose vectors do not depend on them: (captions, path)."""
        with self.db:
            for table in ("items", "staged"):
                self.db.executemany(f"UPDATE {table} SET captions = ? WHERE path = ?",
                                    [(json.dumps(c) if c else None, p) for c, p in updates])

    def staged(self) -> tuple[np.ndarray, np.ndarray]:
        return self._embeddings("staged")

    def publish(self, generation: int, removed_paths: list[str], index_type: str, index_options: dict[str, Any],
                requested_index_type: str | None = None) -> None:
        """Make generation N current: staged rows in, removed paths out, N and its FAISS index
        type recorded, in one transaction; then the manifest's cached copies follow."""
        requested = requested_index_type or self.manifest.get("requested_index_type", "auto")
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO items ({', '.join(COLUMNS)}, embedding) "
                            f"SELECT {', '.join(COLUMNS)}, embedding FROM staged")
            self.db.execute("DELETE FROM staged")
            self.db.executemany("DELETE FROM items WHERE path = ?", [(p,) for p in removed_paths])
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in removed_paths])
            self.db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                                [("generation", str(generation)), ("index_type", index_type),
                                 ("index_options", json.dumps(index_options)), ("requested_index_type", requested)])
        self.manifest["updated"] = _now()
        self.sync_manifest(force=True)

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
    """The published embeddings of ``ids`` (ascending), read from SQLite by ``load``."""

    db: Any
    dim: int
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        wanted = self.ids
        rows = self.db.execute("SELECT id, embedding FROM items WHERE id BETWEEN ? AND ? ORDER BY id",
                               (int(wanted[0]), int(wanted[-1]))).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        keep = np.isin(ids, wanted)
        vectors = np.frombuffer(b"".join(r[1] for r, k in zip(rows, keep) if k), dtype=np.float32)
        return ids[keep], vectors.reshape(int(keep.sum()), self.dim)


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
        legacy = [folder / name for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm")]
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
