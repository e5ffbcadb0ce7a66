"""`mmretrieve info INDEX --verify`: check every part of an index folder against the others.

The manifest parses and is of our format; SQLite opens and passes ``PRAGMA quick_check``; the
stored embeddings are whole (each item names a row of the embeddings file); the
published generation's vector folder exists and its files match the sizes and SHA-256 hashes
its ``index.json`` recorded; the FAISS index loads, holds as many vectors as SQLite holds items
and under the same ids; every stored embedding has the length the dimension says; and the
re-ranking vector file of an IVF-PQ index has the shape its row table says and holds the
stored embeddings. Nothing is written: the database is opened read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexDamagedError, MMRetrieveError
from .damage import index_damaged, rebuild_command, relative_to as _relative

# Rows of the re-ranking vector file compared with the stored embeddings (spread over the file).
VECTOR_FILE_SAMPLE = 1024
# A stored vector equals the embedding it came from; only float noise is allowed.
VECTOR_TOLERANCE = 1e-6
_VECTOR_CHECKS = ("vectors", "files", "faiss", "count", "ids", "vector file")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not run, because a check it depends on failed
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyReport:
    folder: str
    checks: list[Check] = field(default_factory=list)
    verdict: str = ""

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [check for check in self.checks if check.ok is False]

    def lines(self) -> list[str]:
        out = []
        for check in self.checks:
            status = "ok" if check.ok else ("skipped" if check.ok is None else "FAILED")
            out.append(f"{check.name + ':':<13} {status}" + (f" ({check.detail})" if check.detail else ""))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.folder, "ok": self.ok, "checks": [c.as_dict() for c in self.checks],
                "verdict": self.verdict}


class _Checks:
    """Runs checks in order; a check whose prerequisites failed is recorded as skipped."""

    def __init__(self, report: VerifyReport):
        self.report = report

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.report.checks.append(Check(name, ok, detail))
        return ok

    def skip(self, *names: str, because: str) -> None:
        for name in names:
            self.report.checks.append(Check(name, None, f"needs {because}"))


def verify_index(folder: str | Path) -> VerifyReport:
    """Check an index folder; ``report.ok`` says whether it is intact, ``report.verdict`` (one
    sentence) what to do. Raises nothing for damage: every problem is a failed check."""
    folder = Path(folder)
    report = VerifyReport(str(folder))
    checks = _Checks(report)
    manifest = _check_manifest(folder, checks)
    if manifest is not None:
        _check_data(folder, manifest, checks)
    else:
        checks.skip("database", "embeddings", *_VECTOR_CHECKS, because="a readable manifest")
    report.verdict = _verdict(folder, manifest, report)
    return report


def _verdict(folder: Path, manifest: dict[str, Any] | None, report: VerifyReport) -> str:
    problems = report.problems
    if not problems:
        return f"the index {folder} is intact"
    if len(problems) == 1 and problems[0].name == "vectors" and "no generation" in problems[0].detail:
        command = rebuild_command(folder, manifest).replace(" --rebuild", "")
        return f"{folder} holds no published generation yet; run `{command}` to completion"
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return str(index_damaged(folder, f"{first.name}: {first.detail}{more}", manifest))


def _check_manifest(folder: Path, checks: _Checks) -> dict[str, Any] | None:
    from .store import read_manifest

    try:
        manifest = read_manifest(folder)  # checks its keys and the data folder it names
    except MMRetrieveError as exc:
        checks.add("manifest", False, getattr(exc, "problem", str(exc)))
        return None
    checks.add("manifest", True, f"{manifest['format']} v{manifest['format_version']}, {manifest['modality']} "
                                 f"items, {manifest['embed_dim']}-d")
    return manifest


def _check_data(folder: Path, manifest: dict[str, Any], checks: _Checks) -> None:
    from .store import DATABASE, IndexStore, store_name

    data = folder / store_name(manifest, folder)
    where = _relative(data / DATABASE, folder)
    if not (data / DATABASE).is_file():
        checks.add("database", False, f"{where} is missing")
        checks.skip("embeddings", *_VECTOR_CHECKS, because="the database")
        return
    try:
        store = IndexStore(folder, manifest, readonly=True)
    except IndexDamagedError as exc:
        checks.add("database", False, exc.problem)
        checks.skip("embeddings", *_VECTOR_CHECKS, because="the database")
        return
    try:
        if not _check_database(store, where, checks):
            checks.skip("embeddings", *_VECTOR_CHECKS, because="the database")
            return
        counts = store.counts()
        _check_embeddings(store, int(manifest["embed_dim"]), checks)
        _check_vectors(folder, store, counts, int(manifest["embed_dim"]), checks)
    except IndexDamagedError as exc:  # a page quick_check did not visit, met by a later query
        checks.add("database", False, exc.problem)
    finally:
        store.close()


def _check_database(store, where: str, checks: _Checks) -> bool:
    try:
        rows = [row[0] for row in store.db.execute("PRAGMA quick_check(5)").fetchall()]
        tables = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except IndexDamagedError as exc:  # the guarded connection's: "<file> cannot be read (<why>)"
        return checks.add("database", False, exc.problem)
    except Exception as exc:  # noqa: BLE001 - any SQLite error is a finding here, not a crash
        return checks.add("database", False, f"{where} cannot be read ({type(exc).__name__}: {exc})")
    if rows != ["ok"]:
        return checks.add("database", False, f"{where} fails SQLite's quick_check: {'; '.join(map(str, rows))}")
    missing = sorted({"items", "staged", "failures", "info"} - tables)
    if missing:
        return checks.add("database", False, f"{where} has no table {', '.join(missing)}")
    counts = store.counts()
    return checks.add("database", True, f"{where} passes quick_check; {counts['items']:,} items, "
                                        f"{counts['failures']:,} failed files, generation {counts['generation']}")


def _check_embeddings(store, dim: int, checks: _Checks) -> None:
    """Every stored embedding holds ``dim`` float32s, and every item names a row of its own in
    the embeddings file (``IndexStore.embedding_problems``)."""
    total, problems = store.embedding_problems()
    if problems:
        checks.add("embeddings", False, "; ".join(problems))
    else:
        checks.add("embeddings", True, f"{total:,} stored, each of {4 * dim} bytes: {dim} float32s")


def published_vectors(folder: Path, store, manifest: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(where, index.json) of the published generation's vectors, their files' sizes checked (a
    stat each; ``verify_index`` hashes them); None before the first generation. Damage is an
    ``IndexDamagedError`` naming the rebuild command (what `info` says without --verify)."""
    from .base import mismatched_file, read_meta

    generation = store.generation
    vectors = store.vectors_folder(generation)
    where = _relative(vectors, folder)
    if not generation:
        return None
    if not vectors.is_dir():
        raise index_damaged(folder, f"the published generation's vectors ({where}) are missing", manifest)
    try:
        meta = read_meta(vectors)
    except MMRetrieveError as exc:
        raise index_damaged(folder, f"{where}: {getattr(exc, 'problem', exc)}", manifest) from exc
    wrong = mismatched_file(vectors, meta, hashes=False)
    if wrong:
        raise index_damaged(folder, f"{where}: {wrong}", manifest)
    return where, meta


def _check_vectors(folder: Path, store, counts: dict[str, int], dim: int, checks: _Checks) -> None:
    from .backends import load_index
    from .base import mismatched_file, read_meta, recorded_files

    generation = counts["generation"]
    vectors = store.vectors_folder(generation)
    where = _relative(vectors, folder)
    if generation == 0:
        checks.add("vectors", False, "no generation has been published (the first index run did not finish)")
        return checks.skip("files", "faiss", "count", "ids", "vector file", because="a published generation")
    if not vectors.is_dir():
        checks.add("vectors", False, f"{where}, the published generation's folder, is missing")
        return checks.skip("files", "faiss", "count", "ids", "vector file", because="the vectors folder")
    checks.add("vectors", True, where)

    try:
        meta = read_meta(vectors)
    except MMRetrieveError as exc:
        checks.add("files", False, f"{where}: {getattr(exc, 'problem', exc)}")
        return checks.skip("faiss", "count", "ids", "vector file", because="a readable index.json")
    recorded = recorded_files(meta)
    wrong = mismatched_file(vectors, meta, hashes=True)
    if wrong:
        checks.add("files", False, f"{where}: {wrong}")
    elif recorded:
        matched = (f"{len(recorded)} files match their recorded sizes and SHA-256" if len(recorded) > 1
                   else "1 file matches its recorded size and SHA-256")
        checks.add("files", True, f"{matched}: {', '.join(sorted(recorded))}")
    else:
        checks.add("files", True, "no recorded hashes: saved by an older mmretrieve; the checks below still apply")

    try:
        index = load_index(vectors, mmap=True)  # read-only, and light on memory for a large index
    except MMRetrieveError as exc:
        checks.add("faiss", False, f"{where} does not load: {getattr(exc, 'problem', exc)}")
        return checks.skip("count", "ids", "vector file", because="a loaded FAISS index")
    checks.add("faiss", True, f"{meta['kind']} index loads, {len(index):,} vectors of {index.dim} dimensions")
    if index.dim != dim:
        checks.add("count", False, f"the FAISS index is {index.dim}-d, the manifest says {dim}")
    else:
        checks.add("count", len(index) == counts["items"],
                   f"FAISS {len(index):,} vectors, SQLite {counts['items']:,} items")
    faiss_ids = np.asarray(index.ids(), dtype=np.int64)
    sqlite_ids = np.array([row[0] for row in store.db.execute("SELECT id FROM items ORDER BY id")], dtype=np.int64)
    only_faiss = np.setdiff1d(faiss_ids, sqlite_ids)
    only_sqlite = np.setdiff1d(sqlite_ids, faiss_ids)
    if len(only_faiss) or len(only_sqlite):
        parts = []
        if len(only_faiss):
            parts.append(f"{len(only_faiss):,} FAISS ids have no SQLite item (e.g. {_examples(only_faiss)})")
        if len(only_sqlite):
            parts.append(f"{len(only_sqlite):,} SQLite items have no FAISS vector (e.g. {_examples(only_sqlite)})")
        checks.add("ids", False, "; ".join(parts))
    else:
        checks.add("ids", True, f"FAISS and SQLite hold the same {len(faiss_ids):,} ids")
    _check_vector_file(vectors, index, store, where, checks)


def _check_vector_file(vectors: Path, index, store, where: str, checks: _Checks) -> None:
    """IVF-PQ re-ranks from ``vectors.f32``: its rows must match ``row_ids.npy`` and SQLite."""
    from .ivfpq import ROW_IDS_FILE, VECTORS_FILE
    from .npy import read_npy

    path = vectors / VECTORS_FILE
    if not path.is_file():
        checks.add("vector file", True, f"none: {index.kind} keeps no re-ranking vectors")
        return
    dim = index.dim
    row_ids = read_npy(vectors / ROW_IDS_FILE, np.int64)
    size = path.stat().st_size
    if size != len(row_ids) * dim * 4:
        checks.add("vector file", False, f"{where}/{VECTORS_FILE} holds {size:,} bytes, not {len(row_ids):,} rows of "
                                         f"{dim} float32s as {ROW_IDS_FILE} says")
        return
    live = np.flatnonzero(row_ids >= 0)
    sample = live[np.linspace(0, len(live) - 1, min(len(live), VECTOR_FILE_SAMPLE)).astype(np.int64)] \
        if len(live) else live
    matrix = np.memmap(path, dtype=np.float32, mode="r", shape=(len(row_ids), dim)) if len(row_ids) else None
    stored = np.asarray(matrix[sample]) if matrix is not None else np.empty((0, dim), np.float32)
    ids = row_ids[sample]
    expected = store.embeddings_of(ids)
    differ = [int(i) for i, row in zip(ids, stored)
              if int(i) not in expected or not np.allclose(row, expected[int(i)], atol=VECTOR_TOLERANCE)]
    del matrix
    if differ:
        checks.add("vector file", False, f"{len(differ)} of {len(sample)} sampled rows of {VECTORS_FILE} differ from "
                                         f"the stored embeddings (e.g. id {differ[0]})")
    else:
        checks.add("vector file", True, f"{VECTORS_FILE} is {len(row_ids):,} x {dim}; {len(sample):,} sampled rows "
                                        f"equal the stored embeddings")


def _examples(ids: np.ndarray, n: int = 3) -> str:
    return ", ".join(str(int(i)) for i in ids[:n])
