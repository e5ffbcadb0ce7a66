"""The index folder: manifest, SQLite metadata and embeddings, and one FAISS folder per generation.

    manifest.json        format and versions, model fingerprint, dimension, metric, index type, counts
    items.sqlite         items (path, size, mtime, sha256, width, height, captions, embedding),
                         staged rows of a run not yet published, and files that failed to read
    vectors/gen-N/       the FAISS index of generation N

Publishing a generation writes its FAISS folder first, then commits one SQLite transaction
that moves staged rows in, drops vanished ones and records N; the manifest is rewritten after.
Readers take the generation from SQLite, so they see the last complete state and nothing
else. A run that dies leaves its staged rows behind, and the next run picks them up.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import InputError
from ..formats import check_format

FORMAT = "mmretrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "items.sqlite"
VECTORS = "vectors"

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


def _row_to_item(row: tuple) -> Item:
    values = dict(zip(COLUMNS, row))
    values["captions"] = json.loads(values["captions"]) if values["captions"] else None
    return Item(**values)


class IndexStore:
    """Read and write access to one index folder (writers hold the WriterLock)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = Path(folder)
        self.manifest = manifest
        self.db = sqlite3.connect(self.folder / DATABASE, timeout=30)
        self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        self.db.execute("PRAGMA synchronous=NORMAL")

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, manifest: dict[str, Any]) -> "IndexStore":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmretrieve_version": __version__,
                    "created": _now(), **manifest, "generation": 0, "counts": {"items": 0, "failures": 0}}
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder: Path) -> "IndexStore":
        return cls(Path(folder), read_manifest(folder))

    def close(self) -> None:
        self.db.close()

    # -- generations -----------------------------------------------------------------------
    @property
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def vectors_folder(self, generation: int | None = None) -> Path:
        return self.folder / VECTORS / f"gen-{self.generation if generation is None else generation:06d}"

    def remove_stale_vectors(self) -> None:
        """Drop generation folders other than the published one (old, or left by a killed run)."""
        keep = self.vectors_folder().name
        for folder in (self.folder / VECTORS).glob("gen-*"):
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
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM items WHERE id IN ({marks})", ids)
        return {row[0]: _row_to_item(row) for row in rows}

    def item_ids_for_paths(self, paths: Iterable[str]) -> list[int]:
        paths = list(paths)
        out = []
        for start in range(0, len(paths), 500):
            chunk = paths[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out += [r[0] for r in self.db.execute(f"SELECT id FROM items WHERE path IN ({marks})", chunk)]
        return out

    def all_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self._embeddings("items")

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

    def publish(self, generation: int, removed_paths: list[str], manifest_updates: dict[str, Any]) -> None:
        """Make generation N current: staged rows in, removed paths out, in one transaction."""
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO items ({', '.join(COLUMNS)}, embedding) "
                            f"SELECT {', '.join(COLUMNS)}, embedding FROM staged")
            self.db.execute("DELETE FROM staged")
            self.db.executemany("DELETE FROM items WHERE path = ?", [(p,) for p in removed_paths])
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in removed_paths])
            self.db.execute("INSERT OR REPLACE INTO info VALUES ('generation', ?)", (str(generation),))
        self.manifest.update(manifest_updates, generation=generation, updated=_now(),
                             counts={"items": self.count(), "failures": self.count("failures")})
        self.write_manifest()

    def write_manifest(self) -> None:
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=2))


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} holds no index (no {MANIFEST}); build one with `mmretrieve index PATH`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); the index folder is damaged") from None
    check_format(manifest, folder, FORMAT, FORMAT_VERSION, "index", InputError)
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
