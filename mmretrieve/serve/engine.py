"""The search engine behind the service: one worker thread owns the model and the indexes.

Why one thread: the IndexReader's SQLite connection may only be used by the thread that
opened it, and embedders (torch modules, onnxruntime sessions) gain nothing from being called
concurrently on a CPU, where each call already uses every core. Requests queue up here while
the event loop goes on serving; whatever has queued while a batch ran is embedded and
searched together as the next batch (dynamic batching), which is where throughput comes from.
The same thread checks every ``reload_interval`` seconds whether `mmretrieve index` has
published a new generation (or, after `--rebuild`, a new database) and loads it between
batches, without a restart. The check is a few stats (manifest.json and the database file the
reader has open, with its WAL); only when one of them changed is anything read. A new reader is
built completely before it replaces the old one in ``readers``, a dict that is swapped whole, so
a request never finds an index missing; if building it fails, the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import MMRetrieveError
from .config import ServeConfig
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

IMAGES, TEXTS = "images", "texts"


class EngineUnavailable(MMRetrieveError):
    """The engine cannot answer (a reload failed, or it is shutting down); the service says 503."""


class EngineBusy(EngineUnavailable):
    """More queries are waiting than ``max_queued``; the client should retry shortly."""


@dataclass
class _Query:
    kind: str  # "text", "pixels" or "fused"
    payload: Any  # the text, a preprocessed (3, H, W) float32 array, or (pixels, text, fusion strategy)
    target: str  # IMAGES or TEXTS
    k: int
    min_score: float | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Call:
    fn: Callable[[dict], Any]  # called with the readers, on the worker thread
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class SearchEngine:
    def __init__(self, config: ServeConfig, metrics: ServiceMetrics):
        self.config = config
        self.metrics = metrics
        self.readers: dict[str, Any] = {}
        self.embedder = None
        self.status: dict[str, dict[str, Any]] = {}  # per index: generation, items; replaced whole
        self.problem: str | None = None  # why searches are refused, after a failed reload
        # Told (on the worker thread) when an index's database file was replaced or another one is
        # used, or its manifest changed: on_change(name, database file, manifest).
        self.on_change: Callable[[str, Path, dict], None] | None = None
        self.databases: dict[str, Path] = {}  # the SQLite file each reader has open
        self._watched: dict[str, _Watch] = {}  # what the last look at each index folder saw
        self._warned: dict[str, str] = {}  # the last failed reload's message per index, logged once
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fusions: dict[str, Any] = {}  # trained heads by strategy name
        self._fusion_lock = threading.Lock()
        self._last_check = 0.0
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="mmretrieve-search", daemon=True)
        self._thread.start()
        ready.result()  # raises what opening the model or the indexes raised

    # -- asking (from the event loop) --------------------------------------------------------
    async def search_text(self, text: str, target: str, k: int, min_score: float | None = None) -> list:
        return await self._ask(_Query("text", text, target, k, min_score))

    async def search_pixels(self, pixels: np.ndarray, target: str, k: int, min_score: float | None = None) -> list:
        return await self._ask(_Query("pixels", pixels, target, k, min_score))

    async def search_fused(self, pixels: np.ndarray, text: str, strategy, target: str, k: int,
                           min_score: float | None = None) -> list:
        """An image refined by words, fused into one query by ``strategy`` (from ``fusion``)."""
        return await self._ask(_Query("fused", (pixels, text, strategy), target, k, min_score))

    def fusion(self, name: str, weights: str | None = None):
        """The fusion strategy for multimodal queries on the served model. Untrained ones cost
        nothing to build and are built per request (their weights come from clients, so caching
        them would grow without bound); a trained head is read from the model once and kept."""
        from ..fusion.resolve import fusion_spec, resolve_fusion

        spec = fusion_spec(name)
        if not spec.trainable or weights is not None:  # weights on a trained one: resolve_fusion refuses
            return resolve_fusion(self.embedder, name, weights)
        with self._fusion_lock:
            if spec.name not in self._fusions:
                self._fusions[spec.name] = resolve_fusion(self.embedder, spec.name)
            return self._fusions[spec.name]

    async def call(self, fn: Callable[[dict], Any]) -> Any:
        """Run ``fn(readers)`` on the worker thread (the readers' SQLite connections live there)."""
        return await self._ask(_Call(fn))

    async def _ask(self, job) -> Any:
        if not self._thread.is_alive():
            raise EngineUnavailable("the search engine has stopped")
        if self._queue.qsize() >= self.config.max_queued:
            raise EngineBusy(f"the server is busy ({self.config.max_queued} queries waiting); retry in a moment")
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def image_preprocessor(self):
        return self.embedder.image_preprocessor

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------
    def _run(self, ready: concurrent.futures.Future) -> None:
        try:
            self._open()
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                try:
                    first = self._queue.get(timeout=self.config.reload_interval or None)
                except queue.Empty:
                    self._maybe_reload()
                    continue
                if first is _STOP:
                    break
                batch = [first]
                while len(batch) < self.config.max_batch:  # whatever queued while the last batch ran
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.append(job)
                self._maybe_reload()
                self._serve(batch)
        finally:
            self._fail_pending(EngineUnavailable("the search engine is shutting down"))
            for reader in self.readers.values():
                reader.close()

    def _open(self) -> None:
        from ..index.search import IndexReader

        from ..threads import use_policy

        config = self.config
        # Read when the model's sessions are made; the serve policy keeps a core for the event loop.
        policy = use_policy("serve", threads=config.compute_threads)
        images = IndexReader(config.index_dir, model=config.model, runtime=config.runtime, device=config.device)
        if images.modality != "image":
            raise EngineUnavailable(f"{config.index_dir} is an index of {images.modality}s; --index-dir needs an "
                                    f"image index (give a caption index as --text-index-dir)")
        self.embedder = images.embedder  # loads the model now, not on the first request
        _limit_threads(policy.compute)
        readers = {IMAGES: images}
        if config.text_index_dir is not None:
            texts = IndexReader(config.text_index_dir, embedder=self.embedder)
            if texts.modality != "text":
                raise EngineUnavailable(f"{config.text_index_dir} is an index of {texts.modality}s; "
                                        f"--text-index-dir needs a caption index (`mmretrieve index --texts`)")
            readers[TEXTS] = texts
        self.readers = readers
        for name, reader in readers.items():
            self.databases[name] = _database_file(reader)
            self._watched[name] = _look(reader.folder, self.databases[name])
            self._record(name)
        self._last_check = time.monotonic()

    def _record(self, name: str) -> None:
        reader = self.readers[name]
        status = dict(self.status)
        status[name] = {"folder": str(reader.folder), "generation": reader.generation, "items": len(reader.index),
                        "index_type": reader.manifest.get("index_type")}
        self.status = status
        self.metrics.index_items.set(len(reader.index), name)
        self.metrics.index_generation.set(reader.generation, name)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.problem or now - self._last_check < self.config.reload_interval:
            return
        self._last_check = now
        for name in list(self.readers):
            watched_database = self.databases[name]
            seen = _look(self.readers[name].folder, watched_database)
            if seen == self._watched[name]:
                continue  # nothing was written: the common case costs a few stats
            try:
                loaded = self._reload(name, seen)
            except Exception as exc:  # noqa: BLE001 - keep serving what is loaded, and say why not newer
                message = f"could not load the new state of {self.readers[name].folder}: {exc}"
                if self._warned.get(name) != message:  # once per cause, not every interval of a long rebuild
                    log.warning("%s; still serving generation %d", message, self.readers[name].generation)
                    self._warned[name] = message
                continue
            self._warned.pop(name, None)
            if self.databases[name] != watched_database:
                # A rebuild moved the index to another database file: remember that file's look,
                # or the next check would take it for a replaced database and open it again. The
                # manifest's stamp stays the one from before the reload, so a publish meanwhile
                # (every publish rewrites the manifest) is still seen next time.
                fresh = _look(self.readers[name].folder, self.databases[name])
                seen = _Watch(fresh.database, (seen.stamps[0], *fresh.stamps[1:]))
            self._watched[name] = seen
            if loaded:
                self.metrics.reloads.inc(name)
                self._record(name)
                log.info("loaded generation %d of %s (%d items)", self.readers[name].generation,
                         self.readers[name].folder, len(self.readers[name].index))

    def _reload(self, name: str, seen: _Watch) -> bool:
        """Bring one index up to date after its folder changed; True when a new generation (or a
        new database) is in place. Raises, leaving the current reader serving, when it cannot."""
        from ..index.search import IndexReader
        from ..index.store import read_manifest

        current = self.readers[name]
        folder = current.folder
        manifest = read_manifest(folder)
        built_with = manifest["model"]
        if built_with["fingerprint"] != self.embedder.fingerprint:
            self.problem = (f"{folder} was rebuilt with model {built_with['ref']}; restart the server so that it "
                            f"embeds queries with that model")
            log.error(self.problem)
            return False
        if seen.database is not None and seen.database != self._watched[name].database:
            # A new database file where the reader's was (what `index --rebuild` did before it
            # built into a data folder of its own); an open connection would go on reading the
            # old one. Open the new one completely (it raises until it has published), then
            # swap, then close the old one.
            fresh = IndexReader(folder, embedder=self.embedder)
            self.readers = {**self.readers, name: fresh}
            try:
                current.close()
            except Exception as exc:  # noqa: BLE001 - the new reader is in place; only log
                log.warning("could not close the replaced reader of %s: %s", folder, exc)
            loaded = True
        else:
            # A new generation, or (where the index keeps each build in its own data folder) a
            # manifest pointing at another one: the reader loads it whole before it answers again.
            loaded = current.refresh()
        reader = self.readers[name]
        self.databases[name] = _database_file(reader)  # another file: the next look stats that one
        if self.on_change is not None:  # the manifest as read above: a later rewrite is seen next time
            self.on_change(name, self.databases[name], manifest)
        return loaded

    def _serve(self, batch: list) -> None:
        searches: dict[str, list[_Query]] = defaultdict(list)
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away while it waited
            if isinstance(job, _Call):
                _settle(job.future, lambda: job.fn(self.readers))
            elif self.problem:
                job.future.set_exception(EngineUnavailable(self.problem))
            else:
                searches[job.target].append(job)
        for target, jobs in searches.items():
            try:
                results = self._search(target, jobs)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            for job, hits in zip(jobs, results):
                job.future.set_result(hits)

    def _search(self, target: str, jobs: list[_Query]) -> list[list]:
        started = time.perf_counter()
        vectors = np.empty((len(jobs), int(self.embedder.embed_dim)), dtype=np.float32)
        texts = [i for i, job in enumerate(jobs) if job.kind == "text"]
        images = [i for i, job in enumerate(jobs) if job.kind == "pixels"]
        fused = [i for i, job in enumerate(jobs) if job.kind == "fused"]
        # A fused query's text and image join the batch's texts and images: one call per tower.
        text_inputs = [jobs[i].payload for i in texts] + [jobs[i].payload[1] for i in fused]
        pixel_inputs = [jobs[i].payload for i in images] + [jobs[i].payload[0] for i in fused]
        text_vectors = self.embedder.embed_texts(text_inputs) if text_inputs else None
        pixel_vectors = self.embedder.embed_pixels(np.stack(pixel_inputs)) if pixel_inputs else None
        if texts:
            vectors[texts] = text_vectors[:len(texts)]
        if images:
            vectors[images] = pixel_vectors[:len(images)]
        if fused:
            from ..fusion.items import fuse_items

            for n, i in enumerate(fused):
                pair = text_vectors[len(texts) + n][None], pixel_vectors[len(images) + n][None]
                vectors[i] = fuse_items(jobs[i].payload[2], *pair)[0]
        embedded = time.perf_counter()
        # One search at the largest k; each request keeps its own prefix (scores are sorted). The
        # app bounds k (max_k); no more rows than the index holds are asked of FAISS either.
        reader = self.readers[target]
        hits = reader.search_vectors(vectors, k=max(1, min(max(job.k for job in jobs), len(reader.index))))
        done = time.perf_counter()
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.stage_seconds.observe(embedded - started, "embed")
        self.metrics.stage_seconds.observe(done - embedded, "search")
        for job in jobs:
            self.metrics.searches.inc({"pixels": "image"}.get(job.kind, job.kind), target)
        return [[hit for hit in row[:job.k] if job.min_score is None or hit.score >= job.min_score]
                for job, row in zip(jobs, hits)]

    def _fail_pending(self, exc: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)


def _limit_threads(count: int) -> None:
    """torch's and FAISS's OpenMP thread counts, set on this (the worker) thread, which is the
    one that runs them: OpenMP keeps the setting per calling thread."""
    import sys

    from ..threads import set_torch_threads

    if "torch" in sys.modules:
        set_torch_threads(count)
    from ..index.faiss_lib import faiss

    faiss().omp_set_num_threads(count)


@dataclass(frozen=True)
class _Watch:
    """What a few stats say about an index folder; when it differs from the last look, the
    folder is read again. The manifest is rewritten (a new file) on every publish and every
    switch to a new data folder, and the database and its WAL change on every commit."""

    database: tuple[int, int] | None  # (device, inode) of the file at the reader's database path
    stamps: tuple  # (device, inode, mtime, size) of manifest.json, the database and its WAL


def _look(folder: Path, database: Path) -> _Watch:
    from ..index.store import MANIFEST

    stamps = []
    for path in (Path(folder) / MANIFEST, database, Path(f"{database}-wal")):
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)  # e.g. between a rebuild's delete and create: keep what is loaded
        else:
            stamps.append((info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size))
    return _Watch(stamps[1][:2] if stamps[1] else None, tuple(stamps))


def _database_file(reader) -> Path:
    """The SQLite file a reader has open, asked from its connection, so it is right wherever the
    index keeps it."""
    from ..index.store import DATABASE

    db = getattr(getattr(reader, "store", None), "db", None)
    if db is not None:
        for _, schema, file in db.execute("PRAGMA database_list"):
            if schema == "main" and file:
                return Path(file)
    return Path(reader.folder) / DATABASE


def _settle(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - raised again in the waiting request
        future.set_exception(exc)
