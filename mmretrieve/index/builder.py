"""`mmretrieve index`: bring an index folder in line with a folder of images (or a captions file).

New and changed files are decoded in worker processes and embedded in batches; each batch is
staged durably, so a killed run resumes from where it stopped. Publishing a generation
(every ``commit_every`` items and at the end) updates the FAISS index and the metadata in one
atomic step; vanished files are removed at the end of a run.

With a fusion strategy each image is indexed as one item made of the image and its caption
(its first caption, or its title), fused into one vector; a changed caption re-embeds its item.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..progress import progress_bar
from .decode import _init_worker, decode_one, ordered_map
from .lock import WriterLock
from .scan import FileState, check_removal, check_root, plan_changes, scan_files
from .store import MANIFEST, IndexStore, Item

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    index_dir: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    touched: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # not read: links, special or unreadable files
    uncaptioned: int = 0  # fused index: images embedded without a caption (indexed by the image alone)
    total: int = 0
    generation: int = 0
    index_type: str = ""
    seconds: float = 0.0
    items_per_s: float = 0.0


def _check_model(store: IndexStore, embedder, rebuild: bool) -> None:
    built_with = store.manifest["model"]
    if built_with["fingerprint"] != embedder.fingerprint and not rebuild:
        raise InputError(
            f"{store.folder} was built with model {built_with['ref']} (fingerprint {built_with['fingerprint'][:12]}), "
            f"not {embedder.ref} ({embedder.fingerprint[:12]}); index with that model, or pass --rebuild to "
            f"re-embed everything with the new one"
        )


def _check_fusion(store: IndexStore, fusion: dict | None, rebuild: bool) -> None:
    from ..fusion.items import fusion_label

    built_with = store.manifest.get("fusion") or None
    if built_with != fusion and not rebuild:
        raise InputError(f"{store.folder} holds {fusion_label(built_with)}, not {fusion_label(fusion)}; index with the "
                         f"same fusion settings, or pass --rebuild to re-embed everything")


def open_or_create(index_dir: Path, embedder, modality: str, index_type: str, rebuild: bool,
                   fusion=None, captions_source: str | None = None) -> IndexStore:
    """``fusion``: the strategy fusing each image with its caption (None: images alone)."""
    from ..fusion.items import extra_dims
    from ..fusion.resolve import describe_fusion

    described = describe_fusion(fusion) if fusion is not None else None
    if (index_dir / MANIFEST).is_file():
        store = IndexStore.open(index_dir)
        if store.manifest.get("modality") != modality:
            raise InputError(f"{index_dir} indexes {store.manifest.get('modality')}s, not {modality}s; "
                             f"choose another --index-dir")
        _check_model(store, embedder, rebuild)
        _check_fusion(store, described, rebuild)
        if described and not rebuild:  # the captions file (and head folder) a later run reuses
            sources = {"captions": captions_source or store.manifest.get("captions"),
                       "fusion_bundle": getattr(fusion, "source", None) or store.manifest.get("fusion_bundle")}
            if any(store.manifest.get(key) != value for key, value in sources.items()):
                store.manifest.update(sources)
                store.write_manifest()
        if rebuild:
            store.close()
            _clear(index_dir)
        else:
            return store
    return IndexStore.create(index_dir, {
        "modality": modality,
        "model": {"ref": embedder.ref, "path": getattr(embedder, "path", embedder.ref),
                  "fingerprint": embedder.fingerprint},
        "embed_dim": int(embedder.embed_dim) + extra_dims(fusion),
        "query_padding": extra_dims(fusion),  # stored coordinates beyond the model's, 0 in every query
        "metric": "inner_product",
        "normalized": True,
        "requested_index_type": index_type,
        **({"fusion": described, "captions": captions_source, "fusion_bundle": getattr(fusion, "source", None)}
           if fusion is not None else {}),
    })


def _clear(index_dir: Path) -> None:
    import shutil

    for name in (MANIFEST, "items.sqlite", "items.sqlite-wal", "items.sqlite-shm"):
        (index_dir / name).unlink(missing_ok=True)
    shutil.rmtree(index_dir / "vectors", ignore_errors=True)


def publish(store: IndexStore, removed_paths: list[str], memory_budget: int | None = None) -> tuple[int, str]:
    """Write the next generation's FAISS index and make it current."""
    from .backends import choose_index_type, create_index, load_index

    staged_ids, staged_vectors = store.staged()
    removed_ids = store.item_ids_for_paths(removed_paths)
    generation = store.generation
    current_folder = store.vectors_folder(generation)
    live = store.count() - len(set(removed_ids)) + len(set(staged_ids.tolist()) - set(store.items_by_id(staged_ids)))
    requested = store.manifest.get("requested_index_type", "auto")
    kind, options = choose_index_type(max(live, 1), int(store.manifest["embed_dim"]), memory_budget) \
        if requested == "auto" else (requested, {})
    reuse = current_folder.is_dir() and store.manifest.get("index_type") == kind
    if reuse:
        index = load_index(current_folder)
        index.remove(np.asarray(list(removed_ids) + staged_ids.tolist(), dtype=np.int64))
        if len(staged_ids):
            index.add(staged_ids, staged_vectors)
    else:
        # A new index type (the collection crossed a size threshold) or the first generation.
        ids, vectors = store.all_embeddings()
        keep = ~np.isin(ids, np.asarray(removed_ids + staged_ids.tolist(), dtype=np.int64))
        ids = np.concatenate([ids[keep], staged_ids])
        vectors = np.concatenate([vectors[keep], staged_vectors]) if len(ids) else vectors[:0]
        index = create_index(kind, int(store.manifest["embed_dim"]), **options)
        if len(ids):
            index.add(ids, vectors)
    index.save(store.vectors_folder(generation + 1))
    store.publish(generation + 1, removed_paths, {"index_type": kind, "index_options": index.options})
    store.remove_stale_vectors()
    return generation + 1, kind


def index_images(root: str | Path, index_dir: str | Path, embedder, include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = (), index_type: str = "auto", batch_size: int = 32,
                 workers: int = 1, commit_every: int = 5000, captions: dict[str, list[str]] | None = None,
                 rebuild: bool = False, progress: bool = True, memory_budget: int | None = None,
                 fusion=None, captions_source: str | None = None, follow_links: bool = False,
                 prune: bool = False) -> IndexReport:
    """``captions``: {resolved image path: captions}, stored with each item; ``fusion`` (a strategy
    from ``mmretrieve.fusion.resolve``) makes every item the image fused with its first caption.
    ``follow_links``: follow links that leave ``root`` too; ``prune``: allow a run to remove more
    than a fifth of the items under ``root`` (see ``scan.check_removal``)."""
    started = time.perf_counter()
    index_dir = Path(index_dir)
    if fusion is not None and captions is None:
        raise InputError("a fused index joins each image with its caption; give the captions (--captions FILE)")
    check_root(root)  # before the lock creates the index folder
    with WriterLock(index_dir):
        store = open_or_create(index_dir, embedder, "image", index_type, rebuild, fusion, captions_source)
        try:
            return _index_images(store, Path(root), embedder, include, exclude, batch_size, workers, commit_every,
                                 captions, progress, memory_budget, started, fusion, follow_links, prune)
        finally:
            store.close()


def _recaptioned(store: IndexStore, found: list[FileState], plan, captions: dict[str, list[str]],
                 fused: bool) -> list[FileState]:
    """Indexed files whose captions changed: a fused item is re-embedded (returned), a plain one
    only has its metadata updated."""
    embedding = {s.path for s in plan.to_embed}
    stored = store.captions_by_path()
    changed = [s for s in found if s.path not in embedding and s.path in stored
               and (captions.get(s.path) or None) != stored[s.path]]
    if fused:
        first = lambda caps: caps[0] if caps else None  # noqa: E731 - only the first caption is fused
        return [s for s in changed if first(captions.get(s.path)) != first(stored[s.path])]
    store.set_captions([(captions.get(s.path) or None, s.path) for s in changed])
    return []


def _captions_by_found_path(captions: dict[str, list[str]], found: list[FileState]) -> dict[str, list[str]]:
    """Captions are keyed by resolved image paths, files by the path they were found at (a link's
    own path): give each found file its target's captions too."""
    extra = {}
    for state in found:
        if state.path not in captions:
            resolved = os.path.realpath(state.path)
            if resolved in captions:
                extra[state.path] = captions[resolved]
    return {**captions, **extra} if extra else captions


def _record_root(store: IndexStore, root: Path) -> bool:
    """Add the scanned folder (or file), absolute and resolved, to manifest["roots"]: the places
    this index's images come from, which serve uses as its default root. True when it was new."""
    roots = store.manifest.setdefault("roots", [])
    resolved = str(root.resolve())
    if resolved in roots:
        return False
    roots.append(resolved)
    return True


def _index_images(store: IndexStore, root: Path, embedder, include, exclude, batch_size, workers, commit_every,
                  captions, progress, memory_budget, started, fusion=None, follow_links=False,
                  prune=False) -> IndexReport:
    scan = scan_files(root, include, exclude, follow_links=follow_links)
    found = scan.files
    if not found and not store.count():
        raise InputError(f"{root}: no image files to index (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    known = store.known_files()
    plan = plan_changes(found, known, scope=str(root.resolve()), kept=scan.kept)
    check_removal(plan, str(root.resolve()), prune)  # before anything changes
    if captions is not None:
        captions = _captions_by_found_path(captions, found)
        plan.re_embed(_recaptioned(store, found, plan, captions, fusion is not None))
    if plan.touched:
        store.touch([(state.size, state.mtime_ns, state.path) for state, _ in plan.touched])
    # A file that failed before and has not changed since is not retried on every run.
    failed_before = store.failed_files()
    todo, still_failed = [], []
    for state in plan.to_embed:
        previous = failed_before.get(state.path)
        if previous and previous[:2] == (state.size, state.mtime_ns):
            still_failed.append({"path": state.path, "reason": previous[2]})
        else:
            todo.append(state)
    report = IndexReport(str(store.folder), unchanged=plan.unchanged, touched=len(plan.touched),
                         failed=still_failed, skipped=scan.skipped + plan.skipped)
    embedded = _embed_files(store, todo, embedder, batch_size, workers, commit_every, captions or {}, progress, report,
                            memory_budget, fusion)
    failed = {f["path"] for f in report.failed}
    report.updated = sum(1 for s in todo if s.path in known and s.path not in failed)
    report.added = sum(1 for s in todo if s.path not in known and s.path not in failed)
    # A file that was indexed but no longer reads has a stale vector: drop it with the vanished.
    stale = [f["path"] for f in report.failed if f["path"] in known]
    removed = plan.vanished + stale
    roots_changed = _record_root(store, root)
    if store.count("staged") or removed or not store.vectors_folder().is_dir():
        report.generation, report.index_type = publish(store, removed, memory_budget)
    else:
        report.generation, report.index_type = store.generation, store.manifest.get("index_type", "")
        if roots_changed:
            store.write_manifest()
    report.removed = len(removed)
    report.total = store.count()
    report.seconds = round(time.perf_counter() - started, 2)
    report.items_per_s = round(embedded / report.seconds, 2) if report.seconds else 0.0
    for failure in report.failed:
        log.warning("skipped %s: %s", failure["path"], failure["reason"])
    for skip in report.skipped:
        log.info("skipped %s: %s", skip["path"], skip["reason"])
    return report


def _embed_files(store: IndexStore, todo: list[FileState], embedder, batch_size: int, workers: int,
                 commit_every: int, captions: dict[str, list[str]], progress: bool, report: IndexReport,
                 memory_budget: int | None, fusion=None) -> int:
    states = {s.path: s for s in todo}
    batch: list[tuple[Item, np.ndarray]] = []
    failures: list[tuple[str, int, int, str]] = []
    since_publish, embedded = 0, 0

    def flush() -> None:
        nonlocal batch, since_publish, embedded
        if batch:
            vectors = embedder.embed_pixels(np.stack([pixels for _, pixels in batch]))
            if fusion is not None:
                from ..fusion.items import fuse_with_captions

                vectors, uncaptioned = fuse_with_captions(fusion, embedder, vectors, [item.captions for item, _ in batch])
                report.uncaptioned += uncaptioned
            store.stage([item for item, _ in batch], vectors)
            since_publish += len(batch)
            embedded += len(batch)
            batch = []
        if failures:
            store.record_failures(failures)
            failures.clear()

    decoded_stream = ordered_map(decode_one, [s.path for s in todo], workers, initializer=_init_worker,
                                 initargs=(embedder.image_preprocessor,), read_ahead=max(2 * batch_size, 16))
    with progress_bar(total=len(todo), desc="index", unit="img", disable=not progress) as bar:
        for decoded in decoded_stream:
            state = states[decoded.path]
            if decoded.error:
                failures.append((state.path, state.size, state.mtime_ns, decoded.error))
                report.failed.append({"path": state.path, "reason": decoded.error})
            else:
                item = Item(0, state.path, state.size, state.mtime_ns, decoded.sha256, decoded.width, decoded.height,
                            captions.get(state.path))
                batch.append((item, decoded.pixels))
            if len(batch) >= batch_size:
                flush()
            if since_publish >= commit_every:
                publish(store, [], memory_budget)
                since_publish = 0
            bar.update(1)
        flush()
    return embedded


def index_texts(captions_file: str | Path, index_dir: str | Path, embedder, index_type: str = "auto",
                batch_size: int = 256, rebuild: bool = False, progress: bool = True) -> IndexReport:
    """Index every caption of a data file (for image -> text search), one row per caption.

    Rows are keyed by the captions file, the image and the caption's position, so re-indexing
    the file adds and removes only what changed, and several files can share one index.
    """
    from ..data import load_captions

    started = time.perf_counter()
    index_dir = Path(index_dir)
    source = str(Path(captions_file).resolve())
    captioned = load_captions(captions_file, check_images=False)
    rows = {f"{source}::{item.image}#{n}": (caption, str(item.image))
            for item in captioned.items for n, caption in enumerate(item.captions)}
    with WriterLock(index_dir):
        store = open_or_create(index_dir, embedder, "text", index_type, rebuild)
        try:
            known = store.known_files()
            todo = [key for key in rows if key not in known]
            vanished = [key for key in known if key.startswith(f"{source}::") and key not in rows]
            with progress_bar(total=len(todo), desc="index", unit="text", disable=not progress) as bar:
                for start in range(0, len(todo), batch_size):
                    keys = todo[start:start + batch_size]
                    vectors = embedder.embed_texts([rows[key][0] for key in keys])
                    store.stage([Item(0, key, text=rows[key][0], image=rows[key][1]) for key in keys], vectors)
                    bar.update(len(keys))
            generation, kind = publish(store, vanished)
            seconds = round(time.perf_counter() - started, 2)
            return IndexReport(str(index_dir), added=len(todo), removed=len(vanished), unchanged=len(rows) - len(todo),
                               total=store.count(), generation=generation, index_type=kind, seconds=seconds,
                               items_per_s=round(len(todo) / max(seconds, 1e-9), 2))
        finally:
            store.close()


def _recorded_path(path: str | Path, known) -> str | None:
    """The indexed path ``path`` names: as written (a link is recorded under its own name), with
    its folder resolved, or resolved entirely; None if it is not indexed."""
    absolute = os.path.abspath(path)
    candidates = (absolute, os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute)),
                  os.path.realpath(absolute))
    return next((c for c in candidates if c in known), None)


def remove_files(index_dir: str | Path, paths: list[str | Path], memory_budget: int | None = None) -> int:
    """Drop files from an index (as if they had vanished); returns how many were indexed."""
    index_dir = Path(index_dir)
    with WriterLock(index_dir):
        store = IndexStore.open(index_dir)
        try:
            known = store.known_files()
            present = list(dict.fromkeys(filter(None, (_recorded_path(p, known) for p in paths))))
            if present or store.count("staged"):
                publish(store, present, memory_budget)
            return len(present)
        finally:
            store.close()
