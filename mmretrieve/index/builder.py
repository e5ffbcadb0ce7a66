"""`mmretrieve index`: bring an index folder in line with a folder of images (or a captions file).

New and changed files are decoded in worker processes and embedded in batches; each batch is
staged durably, so a killed run resumes from where it stopped. Publishing a generation updates
the FAISS index and the metadata in one atomic step, at the end of a run and on the way
(``publish_due``); vanished files are removed at the end of a run.

With a fusion strategy each image is indexed as one item made of the image and its caption
(its first caption, or its title), fused into one vector; a changed caption re-embeds its item.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..embedding import embed_batches, embed_image_batches
from ..errors import IndexDamagedError, InputError
from ..progress import progress_bar
from .lock import WriterLock
from .scan import FileState, Scan, check_removal, check_root, plan_changes, scan_files
from .store import LEGACY_STORE, MANIFEST, IndexStore, Item, read_manifest, remove_stray_data, store_name

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
    notes: list[str] = field(default_factory=list)  # what the run did besides indexing files, said on stderr
    workers: list[dict] = field(default_factory=list)  # an engine's per-worker throughput (--engine ray)


def _check_model(store: IndexStore, embedder, rebuild: bool) -> None:
    built_with = store.manifest["model"]
    if built_with["fingerprint"] != embedder.fingerprint and not rebuild:
        raise InputError(
            f"{store.folder} was built with model {built_with['ref']} (fingerprint {built_with['fingerprint'][:12]}), "
            f"not {embedder.ref} ({embedder.fingerprint[:12]}); index with that model, or pass --rebuild to "
            f"re-embed everything with the new one"
        )


def _check_fusion(store: IndexStore, fusion: dict | None, rebuild: bool) -> None:
    from .fused import fusion_label

    built_with = store.manifest.get("fusion") or None
    if built_with != fusion and not rebuild:
        raise InputError(f"{store.folder} holds {fusion_label(built_with)}, not {fusion_label(fusion)}; index with the "
                         f"same fusion settings, or pass --rebuild to re-embed everything")


def open_or_create(index_dir: Path, embedder, modality: str, index_type: str | None, rebuild: bool,
                   fusion=None, captions_source: str | None = None, building: dict | None = None) -> IndexStore:
    """The store a run writes to; call ``finish`` when the run is done. Holding the writer lock.

    ``fusion``: the strategy fusing each image with its caption (None: images alone).
    ``index_type``: None keeps the index's own (auto for a new one); another one than the index
    was built with makes the run re-index the stored vectors as that type (``store.reindex``).
    A new index, and every ``rebuild``, is filled in a fresh data folder beside the current one;
    ``finish`` makes it current, so a failed or killed rebuild leaves the old index as it was.
    ``building`` (the folder or file indexed, and filters) lets a killed build be resumed.
    """
    from ..bundle import absolute_ref
    from .fused import describe_fusion, extra_dims

    described = describe_fusion(fusion) if fusion is not None else None
    current, generation = None, 0
    manifest = _current_manifest(index_dir, rebuild)
    if manifest is not None:
        if manifest.get("modality") != modality:
            raise InputError(f"{index_dir} indexes {manifest.get('modality')}s, not {modality}s; "
                             f"choose another --index-dir")
        if not rebuild:
            return _open_current(index_dir, embedder, index_type, described, fusion, captions_source)
        current = store_name(manifest, index_dir)
        generation = _published_generation(index_dir, manifest)
    model_path = _model_path(embedder)
    new = {
        "modality": modality,
        "model": {"ref": absolute_ref(embedder.ref), "path": model_path, "fingerprint": embedder.fingerprint,
                  **_relative_model_path(model_path, embedder.ref, index_dir)},
        "embed_dim": int(embedder.embed_dim) + extra_dims(fusion),
        "query_padding": extra_dims(fusion),  # stored coordinates beyond the model's, 0 in every query
        "metric": "inner_product",
        "normalized": True,
        # A rebuild keeps the kind asked for before, unless another one is given.
        "requested_index_type": index_type or (manifest or {}).get("requested_index_type") or "auto",
        **({"fusion": described, "captions": captions_source, "fusion_bundle": getattr(fusion, "source", None)}
           if fusion is not None else {}),
        **({"building": building} if building else {}),
    }
    store = IndexStore.resume(index_dir, new, replaces=current)
    if store is not None:
        log.warning("resuming the build that a previous run left in %s", store.data_folder)
    # Data folders no manifest names: replaced by a rebuild, or left by a killed one.
    remove_stray_data(index_dir, {name for name in (current, store and store.name) if name}
                      | ({LEGACY_STORE} if current is None else set()))
    return store or IndexStore.create(index_dir, new, replaces=current, generation=generation)


def _current_manifest(index_dir: Path, rebuild: bool) -> dict | None:
    """The index's manifest, None for a new index; a rebuild also starts over from a manifest that
    is damaged (not JSON, not an object, naming no modality or a data folder an index does not
    write): rebuilding is how a damaged index is recovered. The new data folder is made beside the
    old data, and its manifest replaces the damaged one at its first generation."""
    if not (index_dir / MANIFEST).is_file():
        return None
    try:
        return read_manifest(index_dir)
    except IndexDamagedError as exc:
        if not rebuild:
            raise
        log.warning("%s: %s; building a new index in its place", index_dir, exc.problem)
        return None


def _published_generation(index_dir: Path, manifest: dict) -> int:
    """The generation a rebuild continues from (so generations only grow); 0 if it cannot be read."""
    try:
        with IndexStore(index_dir, manifest, readonly=True) as old:
            return old.generation
    except (InputError, sqlite3.Error):
        return int(manifest.get("generation", 0) or 0)


def _open_current(index_dir: Path, embedder, index_type: str | None, described, fusion,
                  captions_source: str | None) -> IndexStore:
    store = IndexStore.open(index_dir)
    try:
        _check_model(store, embedder, False)
        _check_fusion(store, described, False)
        remove_stray_data(index_dir, {store.name})
        store.sync_manifest()  # counts and generation from SQLite, if a kill left the manifest behind
        if described:  # the captions file (and head folder) a later run reuses
            sources = {"captions": captions_source or store.manifest.get("captions"),
                       "fusion_bundle": getattr(fusion, "source", None) or store.manifest.get("fusion_bundle")}
            if any(store.manifest.get(key) != value for key, value in sources.items()):
                store.manifest.update(sources)
                store.write_manifest()
        if index_type is not None and index_type != store.manifest.get("requested_index_type", "auto"):
            store.reindex, store.reindex_from = index_type, store.published_index_type()[0]
    except BaseException:
        store.close()
        raise
    return store


def _model_path(embedder) -> str:
    """Where the model folder is, absolute and resolved (a name a plugin registered as it is)."""
    from ..bundle import absolute_ref

    return absolute_ref(getattr(embedder, "path", embedder.ref))


def _relative_model_path(model_path: str, ref: str, index_dir: Path) -> dict:
    """{"relative_path": the model folder relative to the index folder}, for a model given as a
    path (not a registered name), so an index moved together with its model still finds it."""
    if not Path(model_path).is_absolute() or not Path(ref).expanduser().exists():
        return {}
    return {"relative_path": os.path.relpath(model_path, Path(index_dir).absolute().resolve())}


def finish(store: IndexStore, report: IndexReport | None = None, generation_at_open: int | None = None,
           memory_budget: int | None = None) -> None:
    """End a run: re-index for a new --index-type if the run did not publish, make a pending data
    folder current (deleting the one it replaced), and leave the manifest's counts right."""
    if store.reindex is not None:
        wanted, before = store.reindex, store.reindex_from
        if store.generation == generation_at_open or not store.vectors_folder().is_dir():
            if wanted == before and store.vectors_folder().is_dir():
                store.set_requested_index_type(wanted)  # already that kind: nothing to rebuild
            else:
                generation, kind = publish(store, [], memory_budget)
                if report is not None:
                    report.generation, report.index_type = generation, kind
        after = store.published_index_type()[0]
        if report is not None:
            report.notes.append(
                f"index type {wanted}: the {before} index was rebuilt as {after} from the {store.count():,} vectors "
                f"stored in the index, without embedding anything again" if after != before else
                f"index type {wanted}: the index already is {after}, so it was kept as it is")
        store.reindex = None
    if store.pending:
        if not store.vectors_folder().is_dir():
            generation, kind = publish(store, [], memory_budget)
            if report is not None:
                report.generation, report.index_type = generation, kind
        store.sync_manifest()
        store.activate()
        remove_stray_data(store.folder, {store.name})
    else:
        store.sync_manifest()


# The most staged vectors a run lets wait for a publish, which reads them all at once.
STAGED_BYTES_MAX = 256 << 20


def publish_due(since_publish: int, published: int, commit_every: int, dim: int) -> bool:
    """Whether a run publishes the items staged since the last publish before going on: once they
    are ``commit_every`` or more and at least as many as the index held then, or once they hold
    ``STAGED_BYTES_MAX`` of ``dim``-d vectors. Each publish writes the whole FAISS index again, so
    publishing every ``commit_every`` items wrote O(N^2 / commit_every) vectors (200 rewrites of
    up to 3.6 GB for a million photos of 896-d, 100 times the final index); an interval that
    grows with the index, up to the cap that bounds a publish's memory, publishes 18 times and
    writes 8 times the final index (docs/benchmarks.md, "Publishing on the way"). A new index
    still becomes searchable after its first ``commit_every``."""
    cap = max(commit_every, STAGED_BYTES_MAX // (4 * dim))
    return since_publish >= min(max(commit_every, published), cap)


def publish(store: IndexStore, removed_paths: list[str], memory_budget: int | None = None) -> tuple[int, str]:
    """Write the next generation's FAISS index and make it current."""
    from .backends import ArrayShard, build_index, choose_index_type, load_index, shard_rows

    staged_ids, staged_vectors = store.staged()
    removed_ids = store.item_ids_for_paths(removed_paths)
    generation = store.generation
    current_folder = store.vectors_folder(generation)
    live = store.count() - len(set(removed_ids)) + len(set(staged_ids.tolist()) - set(store.items_by_id(staged_ids)))
    requested = store.reindex or store.manifest.get("requested_index_type", "auto")
    kind, options = choose_index_type(max(live, 1), int(store.manifest["embed_dim"]), memory_budget) \
        if requested == "auto" else (requested, {})
    reuse = current_folder.is_dir() and store.published_index_type()[0] == kind
    index = None
    if reuse:
        try:
            index = load_index(current_folder)
        except IndexDamagedError as exc:  # FAISS is derived: the stored embeddings make it again
            log.warning("%s: %s; building the vectors again from the embeddings stored in the index", store.folder,
                        exc.problem)
    if index is not None:
        index.remove(np.asarray(list(removed_ids) + staged_ids.tolist(), dtype=np.int64))
        if len(staged_ids):
            index.add(staged_ids, staged_vectors)
    else:
        # A new index type (the collection crossed a size threshold), the first generation, or
        # published vectors that are damaged.
        # Read from SQLite one shard at a time (IVF-PQ trains on a sample drawn across them).
        dim = int(store.manifest["embed_dim"])
        shards = store.embedding_shards(shard_rows(dim), removed_ids + staged_ids.tolist())
        shards += ArrayShard.split(staged_ids, staged_vectors, shard_rows(dim))
        index = build_index(kind, dim, shards, **options)
    index.save(store.vectors_folder(generation + 1))
    store.publish(generation + 1, removed_paths, kind, index.options, requested, staged=(staged_ids, staged_vectors))
    store.remove_stale_vectors()
    if store.pending and store.replaces is None:
        store.activate()  # a new index is searchable from its first generation; a rebuild waits for finish
    return generation + 1, kind


def index_images(root: str | Path, index_dir: str | Path, embedder, include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = (), index_type: str | None = None, batch_size: int = 32,
                 workers: int = 1, commit_every: int = 5000, captions: dict[str, list[str]] | None = None,
                 rebuild: bool = False, progress: bool = True, memory_budget: int | None = None,
                 fusion=None, captions_source: str | None = None, follow_links: bool = False,
                 prune: bool = False, engine=None) -> IndexReport:
    """``captions``: {resolved image path: captions}, stored with each item; ``fusion`` (a strategy
    from ``mmretrieve.fusion.resolve``) makes every item the image fused with its first caption.
    ``follow_links``: follow links that leave ``root`` too; ``prune``: allow a run to remove more
    than a fifth of the items under ``root`` (see ``scan.check_removal``). ``index_type`` None keeps
    the index's own; ``rebuild`` re-embeds everything into a new data folder, published only when
    complete (see ``open_or_create``). ``engine`` embeds elsewhere (``ray_engine.RayEngine``) instead
    of in ``workers`` local decoding processes and this process."""
    started = time.perf_counter()
    index_dir = Path(index_dir)
    if fusion is not None and captions is None:
        raise InputError("a fused index joins each image with its caption; give the captions (--captions FILE)")
    check_root(root)  # before the lock creates the index folder
    # What can be refused is refused before a data folder is made (and the old one is never touched),
    # and for a new index before the lock creates its folder. The scan reads only the images' folder.
    scan = scan_files(Path(root), include, exclude, follow_links=follow_links)
    nothing = InputError(f"{root}: no image files to index (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    if not scan.files and (rebuild or not (index_dir / MANIFEST).is_file()):
        raise nothing
    if fusion is not None:
        _check_captioned(Path(root), scan.files, _captions_by_found_path(captions, scan.files))
    if engine is not None and scan.files:
        engine.check_readable(Path(root).resolve(), scan.files[0].path)  # every worker reads the files
    with WriterLock(index_dir):
        if not scan.files and not (index_dir / MANIFEST).is_file():  # removed while we waited for the lock
            raise nothing
        building = {"root": str(Path(root).resolve()), "include": list(include), "exclude": list(exclude)}
        store = open_or_create(index_dir, embedder, "image", index_type, rebuild, fusion, captions_source, building)
        generation = store.generation
        try:
            report = _index_images(store, Path(root), embedder, include, exclude, batch_size, workers, commit_every,
                                   captions, progress, memory_budget, started, fusion, follow_links, prune, scan,
                                   engine)
            finish(store, report, generation, memory_budget)
            return report
        except InputError:
            if store.fresh and store.pending:
                store.discard()  # refused before it embedded anything worth keeping: the index is as it was
            raise
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


def _seed_roots(store: IndexStore, paths: list[str]) -> None:
    """An index from before "roots" was recorded: start them with the folders its items came
    from (see ``_item_folders``), so the first run over a subfolder does not narrow what serve
    sends to that subfolder."""
    store.manifest["roots"] = _item_folders(paths)


def _item_folders(paths: list[str]) -> list[str]:
    """The narrowest folders that hold every path: their common folder, unless that is the
    filesystem's root; then each distinct parent folder, less those inside another one."""
    if not paths:
        return []
    common = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    if os.path.dirname(common) != common:
        return [common]
    folders: list[str] = []
    for folder in sorted({os.path.dirname(path) for path in paths}):
        if not folders or not (folder + "/").startswith(folders[-1].rstrip("/") + "/"):
            folders.append(folder)
    return folders


def _old_link_records(scan: Scan, known: dict, scope: str, roots: list[str]) -> list[str]:
    """Items outside ``scope`` recorded under the resolved target of a link found below it: what an
    older mmretrieve did with links (the scan now records a link's own path). Items in a folder
    indexed in its own right (in ``roots``) stay."""
    folders = [folder for folder in [scope, *roots] if isinstance(folder, str)]
    prefixes = tuple(folder.rstrip("/") + "/" for folder in folders)
    inside = lambda path: path in folders or path.startswith(prefixes)  # noqa: E731
    outside = [path for path in known if not inside(path)]
    if not outside:  # nothing recorded outside can be an old link's target: no link need be resolved
        return []
    targets = {os.path.realpath(link) for link in scan.links}
    targets = sorted(t for t in targets if not inside(t))
    if not targets:
        return []
    folders = tuple(t.rstrip("/") + "/" for t in targets)
    exact = set(targets)
    return [path for path in outside if path in exact or path.startswith(folders)]


def _check_captioned(root: Path, found: list[FileState], captions: dict[str, list[str]]) -> None:
    """A fused index needs captions: refuse when no image has one, warn when most have none."""
    if not found:
        return
    missing = sum(1 for state in found if not captions.get(state.path))
    if missing == len(found):
        raise InputError(f"none of the {len(found)} images in {root} has a caption in the captions file, so a fused "
                         f"index would hold images alone; check that the file names these images (paths relative "
                         f"to the file), or index without --fusion")
    if 2 * missing > len(found):
        log.warning("%d of the %d images in %s have no caption and are indexed by the image alone; check that the "
                    "captions file names these images", missing, len(found), root)


def _forget_gone_failures(store: IndexStore, failed_before: dict, found: list[FileState], root: Path,
                          kept: list[str]) -> None:
    """Files that failed to read and are gone from under ``root`` are failures no more (and are
    not counted as such), except below folders that could not be read (``kept``)."""
    scope = str(root.resolve())
    prefix = scope.rstrip("/") + "/"
    unreadable = tuple(folder.rstrip("/") + "/" for folder in kept)
    seen = {state.path for state in found}
    gone = [p for p in failed_before
            if p not in seen and (p == scope or p.startswith(prefix)) and not p.startswith(unreadable)]
    if gone:
        store.forget_failures(gone)
        for path in gone:
            failed_before.pop(path)


def _index_images(store: IndexStore, root: Path, embedder, include, exclude, batch_size, workers, commit_every,
                  captions, progress, memory_budget, started, fusion=None, follow_links=False,
                  prune=False, scan: Scan | None = None, engine=None) -> IndexReport:
    scan = scan if scan is not None else scan_files(root, include, exclude, follow_links=follow_links)
    found = scan.files
    if not found and not store.count():
        raise InputError(f"{root}: no image files to index (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    known = store.known_files()
    scope = str(root.resolve())
    # Items an older version recorded under the targets of links below the folder go (the link's own
    # path is indexed when the link is followed), so a link removed later vanishes like a file.
    old_links = _old_link_records(scan, known, scope, store.manifest.get("roots") or [])
    if "roots" not in store.manifest and not store.pending and known:
        _seed_roots(store, [path for path in known if path not in set(old_links)])
    plan = plan_changes(found, known, scope=scope, kept=scan.kept)
    check_removal(plan, scope, prune)  # before anything changes
    if captions is not None:
        captions = _captions_by_found_path(captions, found)
        plan.re_embed(_recaptioned(store, found, plan, captions, fusion is not None))
    if plan.touched:
        store.touch([(state.size, state.mtime_ns, state.path) for state, _ in plan.touched])
    # A file that failed before and has not changed since is not retried on every run.
    failed_before = store.failed_files()
    _forget_gone_failures(store, failed_before, found, root, scan.kept)
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
                            memory_budget, fusion, engine)
    failed = {f["path"] for f in report.failed}
    report.updated = sum(1 for s in todo if s.path in known and s.path not in failed)
    report.added = sum(1 for s in todo if s.path not in known and s.path not in failed)
    # A file that was indexed but no longer reads has a stale vector: drop it with the vanished.
    stale = [f["path"] for f in report.failed if f["path"] in known]
    removed = plan.vanished + stale + old_links
    if old_links:
        report.notes.append(f"{len(old_links)} items recorded by an older mmretrieve under the targets of links "
                            f"in {root} were removed" + (", and indexed under the links' own paths"
                                                        if follow_links else ""))
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
                 memory_budget: int | None, fusion=None, engine=None) -> int:
    states = {s.path: s for s in todo}
    # Rows a killed run left staged wait with this run's for the same publish.
    since_publish, embedded, published = store.count("staged"), 0, store.count()
    dim = int(store.manifest["embed_dim"])
    paths = [s.path for s in todo]
    with progress_bar(total=len(todo), desc="index", unit="img", disable=not progress) as bar:
        # The engine (None: this machine) turns the files into batches of vectors and failures.
        batches = engine.image_batches(paths, embedder, batch_size, bar) if engine is not None else \
            embed_image_batches(paths, embedder.image_preprocessor, embedder.embed_pixels, batch_size, workers, bar)
        for batch in batches:
            if batch.decoded:
                items = [Item(0, d.path, states[d.path].size, states[d.path].mtime_ns, d.sha256, d.width, d.height,
                              captions.get(d.path)) for d in batch.decoded]
                vectors = batch.vectors
                if fusion is not None:
                    from .fused import fuse_with_captions

                    vectors, uncaptioned = fuse_with_captions(fusion, embedder, vectors, [i.captions for i in items])
                    report.uncaptioned += uncaptioned
                store.stage(items, vectors)
                since_publish += len(items)
                embedded += len(items)
            if batch.failed:
                store.record_failures([(d.path, states[d.path].size, states[d.path].mtime_ns, d.error)
                                       for d in batch.failed])
                report.failed += [{"path": d.path, "reason": d.error} for d in batch.failed]
            if not batch.final and publish_due(since_publish, published, commit_every, dim):
                publish(store, [], memory_budget)
                since_publish, published = 0, store.count()
    if engine is not None:
        report.workers = engine.worker_throughput()
    return embedded


def index_texts(captions_file: str | Path, index_dir: str | Path, embedder, index_type: str | None = None,
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
        store = open_or_create(index_dir, embedder, "text", index_type, rebuild, building={"captions": source})
        opened_at = store.generation
        try:
            known = store.known_files()
            todo = [key for key in rows if key not in known]
            vanished = [key for key in known if key.startswith(f"{source}::") and key not in rows]
            with progress_bar(total=len(todo), desc="index", unit="text", disable=not progress) as bar:
                for keys, vectors in embed_batches(todo, lambda keys: embedder.embed_texts([rows[k][0] for k in keys]),
                                                   batch_size, bar):
                    store.stage([Item(0, key, text=rows[key][0], image=rows[key][1]) for key in keys], vectors)
            generation, kind = publish(store, vanished)
            seconds = round(time.perf_counter() - started, 2)
            report = IndexReport(str(index_dir), added=len(todo), removed=len(vanished),
                                 unchanged=len(rows) - len(todo), total=store.count(), generation=generation,
                                 index_type=kind, seconds=seconds, items_per_s=round(len(todo) / max(seconds, 1e-9), 2))
            finish(store, report, opened_at)
            return report
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
            remove_stray_data(index_dir, {store.name})
            known = store.known_files()
            present = list(dict.fromkeys(filter(None, (_recorded_path(p, known) for p in paths))))
            if present or store.count("staged"):
                publish(store, present, memory_budget)
            finish(store)
            return len(present)
        finally:
            store.close()
