"""What every vector index shares: input checks, the id table, result padding and the folder format.

An index folder holds ``index.json`` (format, format_version, mmretrieve_version, kind, dim,
options, count, files) next to the files the backend writes; ``files`` records the size and
SHA-256 of each of them ({name: {"size", "sha256"}}; folders saved before it have none). Each
file is written atomically and ``index.json`` last, with the count it expects, so a save
interrupted between files is detected on load rather than read half-new; a file whose size
differs from the recorded one is refused on load, and ``mmretrieve.index.verify`` re-hashes them.
Callers that need the whole folder to switch at once wrap the save in
``mmretrieve.atomic.atomic_directory``.
"""

from __future__ import annotations

import abc
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import __version__
from ..atomic import write_text_atomic
from ..errors import ConfigError, InputError
from ..formats import read_folder_manifest, sha256_file
from .damage import vectors_damaged as _damaged
from .idmap import SortedIds

META_FILE = "index.json"
FORMAT_NAME = "mmretrieve-vector-index"
FORMAT_VERSION = 1
# Added vectors must be unit length: inner product is then cosine similarity, which the
# scores promise. Half-precision encoders normalise to about 1e-3, hence the slack.
NORM_TOLERANCE = 1e-2


def read_meta(folder: Path) -> dict[str, Any]:
    """The parsed ``index.json`` of an index folder, or an InputError that says what is wrong."""
    meta = read_folder_manifest(folder, META_FILE, FORMAT_NAME, FORMAT_VERSION, "vector index", InputError,
                                damaged=lambda problem: _damaged(folder, problem))
    for key, kind in (("kind", str), ("dim", int), ("options", dict), ("count", int)):
        if not isinstance(meta.get(key), kind):
            raise _damaged(folder, f"{META_FILE}: {key!r} is missing or not a {kind.__name__}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise _damaged(folder, f"{META_FILE}: 'files' is not a table of sizes and SHA-256 hashes")
    return meta


def recorded_files(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256"}} as ``save`` recorded them; empty for folders saved before
    hashes were recorded."""
    return dict(meta.get("files", {}))


def mismatched_file(folder: Path, meta: dict[str, Any], hashes: bool = True) -> str | None:
    """What is wrong with the first recorded file that is missing, of another size or (with
    ``hashes``) of other contents; None when every one matches."""
    folder = Path(folder)
    for name, expected in recorded_files(meta).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} holds {size:,} bytes, {META_FILE} recorded {expected['size']:,}"
        if hashes and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256 (its contents changed)"
    return None


def _file_states(folder: Path) -> dict[str, tuple[int, int, int]]:
    """{name: (inode, size, mtime_ns)} of the visible regular files in ``folder``."""
    states = {}
    for path in folder.iterdir():
        if path.name != META_FILE and not path.name.startswith(".") and path.is_file():
            stat = path.stat()
            states[path.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return states


def as_ids(ids: Any) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise InputError(f"ids must be a 1-d array of integers, got shape {array.shape} and dtype {array.dtype}")
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise InputError("ids must fit in int64")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise InputError("ids must be >= 0 (-1 marks a missing result)")
    return np.ascontiguousarray(array)


def as_vectors(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1 and what == "queries":
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise InputError(f"{what} must have shape (n, {dim}), got {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(array)


def move_missing_last(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad with (-inf, -1), keeping real results first and in their order."""
    missing = ids < 0
    scores = np.where(missing, -np.inf, scores).astype(np.float32, copy=False)
    if missing.any():
        order = np.argsort(missing, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
    return scores, ids.astype(np.int64, copy=False)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, best first (fewer if there are fewer)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1)
    return np.argsort(-scores, axis=1, kind="stable")


def padding(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


class VectorIndex(abc.ABC):
    """Base class: L2-normalised float32 vectors under int64 ids, scored by inner product.

    Subclasses set ``kind``, ``OPTION_DEFAULTS`` and ``SEARCH_OPTIONS`` and implement
    ``_add``, ``_remove``, ``_search``, ``_save_files``, ``_load_files`` and ``memory_bytes``.
    The base class checks inputs, refuses duplicate ids and owns ``_live``, the table of
    live ids (with their storage row when ``TRACKS_ROWS``).
    """

    kind: ClassVar[str]
    OPTION_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Options read at search time, which ``set_search_options`` may change on a built index.
    SEARCH_OPTIONS: ClassVar[frozenset[str]] = frozenset()
    TRACKS_ROWS: ClassVar[bool] = False

    def __init__(self, dim: int, **options: Any):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"{self.kind} index: dim must be a positive integer, not {dim!r}")
        self.dim = int(dim)
        self.options: dict[str, Any] = self._resolve_options(options)
        self.read_only = False  # True after load(mmap=True): faiss cannot grow mapped storage
        self._live = SortedIds(track_rows=self.TRACKS_ROWS)

    # -- options -----------------------------------------------------------------------------
    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.OPTION_DEFAULTS))
        if unknown:
            known = ", ".join(sorted(self.OPTION_DEFAULTS)) or "none"
            raise ConfigError(f"{self.kind} index has no option {', '.join(map(repr, unknown))} (options: {known})")
        resolved = {**self.OPTION_DEFAULTS, **options}
        self._check_options(resolved)
        return resolved

    def _check_options(self, options: dict[str, Any]) -> None:
        """Raise ConfigError for invalid values; subclasses extend."""

    def _positive_int(self, options: dict[str, Any], name: str, minimum: int = 1) -> int:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{self.kind} index: option {name!r} must be an integer >= {minimum}, not {value!r}")
        options[name] = int(value)
        return int(value)

    def set_search_options(self, **options: Any) -> None:
        """Change search-time options (``ef_search``, ``nprobe``, ``rerank``) without rebuilding."""
        fixed = sorted(set(options) - self.SEARCH_OPTIONS)
        if fixed:
            raise ConfigError(f"{self.kind} index: {', '.join(map(repr, fixed))} cannot change after the "
                              f"index is built (search options: {', '.join(sorted(self.SEARCH_OPTIONS)) or 'none'})")
        merged = {**self.options, **options}
        self._check_options(merged)
        self.options = merged

    # -- the public operations ---------------------------------------------------------------
    def add(self, ids: Any, vectors: Any) -> None:
        """Add vectors under new ids; an id already present (or repeated) is an InputError."""
        self._check_writable()
        ids = as_ids(ids)
        vectors = as_vectors(vectors, self.dim)
        if len(ids) != len(vectors):
            raise InputError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        norms = np.linalg.norm(vectors, axis=1)
        if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
            worst = norms[np.argmax(np.abs(norms - 1.0))]
            raise InputError(f"vectors must be L2-normalised (found a norm of {worst:.4g})")
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            raise InputError(f"id {int(unique[counts > 1][0])} appears twice in one add")
        present = self._live.contains(ids)
        if present.any():
            raise InputError(f"id {int(ids[present][0])} is already in the index (remove it first to replace it)")
        self._add(ids, vectors)

    def remove(self, ids: Any) -> int:
        """Remove ids; returns how many were present. Unknown ids are ignored."""
        self._check_writable()
        ids = np.unique(as_ids(ids))
        present = ids[self._live.contains(ids)]
        if len(present):
            self._remove(present)
        return len(present)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query: (nq, k) float32 scores and int64 ids, padded with -inf / -1."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, not {k!r}")
        queries = as_vectors(queries, self.dim, "queries")
        if len(self) == 0 or len(queries) == 0:
            return padding(len(queries), int(k))
        return move_missing_last(*self._search(queries, int(k)))

    def __len__(self) -> int:
        return len(self._live)

    def ids(self) -> np.ndarray:
        """All live ids, ascending."""
        return np.array(self._live.keys)

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Resident size of the index structures, id tables included, from their element counts.

        Files read through memory maps (IVF-PQ's re-ranking vectors; everything after
        ``load(mmap=True)``) are page cache, which the OS can evict, and are not counted.
        """

    def _check_writable(self) -> None:
        if self.read_only:
            raise InputError(f"this {self.kind} index was loaded with mmap=True and is read-only; "
                             "load it without mmap to add or remove vectors")

    # -- persistence -------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        before = _file_states(folder)
        self._save_files(folder)
        # The files this save wrote (new, or replaced: atomic writes change the inode), not
        # leftovers of another save into the same folder.
        written = sorted(name for name, state in _file_states(folder).items() if before.get(name) != state)
        files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
                 for name in written}
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mmretrieve_version": __version__,
                "kind": self.kind, "dim": self.dim, "options": self.options, "count": len(self), "files": files}
        write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> "VectorIndex":
        """Read an index folder written by ``save``; ``mmap=True`` maps it read-only."""
        folder = Path(folder)
        meta = read_meta(folder)
        if meta["kind"] != cls.kind:
            raise InputError(f"{folder} holds a {meta['kind']!r} index, not a {cls.kind!r} one; "
                             "use mmretrieve.index.backends.load_index to open any kind")
        try:
            index = cls(meta["dim"], **meta["options"])
        except ConfigError as exc:
            raise _damaged(folder, f"{META_FILE} has invalid options ({exc})") from exc
        wrong = mismatched_file(folder, meta, hashes=False)  # sizes only: a stat per file, no reading
        if wrong:
            raise _damaged(folder, wrong)
        try:
            index._load_files(folder, mmap)
        except FileNotFoundError as exc:
            raise _damaged(folder, f"{Path(exc.filename).name} is missing") from exc
        except (OSError, ValueError, RuntimeError) as exc:  # faiss reports corrupt files as RuntimeError
            raise _damaged(folder, f"its files cannot be read ({type(exc).__name__}: {_first_line(exc)})") from exc
        index.read_only = mmap
        if len(index) != meta["count"]:
            raise _damaged(folder, f"{META_FILE} says {meta['count']} vectors, the data holds {len(index)} "
                                   f"(a save was interrupted?)")
        return index

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store checked, new, unique ids with unit vectors, and record them in ``_live``."""

    @abc.abstractmethod
    def _remove(self, ids: np.ndarray) -> None:
        """Remove ids that are all present and unique, from storage and from ``_live``."""

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (nq, k) of a non-empty index; -1 ids where there are fewer than k."""

    @abc.abstractmethod
    def _save_files(self, folder: Path) -> None:
        """Write the backend's files into ``folder``, each atomically."""

    @abc.abstractmethod
    def _load_files(self, folder: Path, mmap: bool) -> None:
        """Fill this freshly constructed index from the files ``_save_files`` wrote."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, n={len(self)}, options={self.options})"


def _first_line(exc: BaseException) -> str:
    """faiss's messages carry a C++ function and location ("Error in ... at file.cpp:12: ") and
    sometimes several lines; keep the gist."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _FAISS_LOCATION.sub("", text)
    return text if len(text) <= 200 else text[:197] + "..."


_FAISS_LOCATION = re.compile(r"^Error in .*? at \S+:\d+: ")
