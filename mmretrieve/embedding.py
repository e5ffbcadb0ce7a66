"""Embedding a collection through a tower: the one batch loop every caller uses.

Texts (or any items a tower preprocesses itself) go through ``embed_batches``; images go
through ``embed_image_batches``, which decodes them in the pool of ``mmretrieve.decode`` and
yields each batch's vectors with the images that failed since the previous batch, each with its
reason (or, ``strict``, raises InputError on the first). The indexer, eval, ``mmretrieve embed``
and training's frozen-tower cache all come through here; a progress bar passed in counts items.

torch is imported only by the functions that run a torch module (``torch_rows`` and those built
on it), so a runtime's embedder (onnx) embeds through this module without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from .atomic import fsync_dir, pid_alive, write_npy_atomic
from .augment import ViewAugmentation, decode_views, init_views
from .decode import Decoded, decode_images, ordered_map
from .errors import InputError
from .progress import progress_bar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def stack_rows(rows: list[np.ndarray], dim: int) -> np.ndarray:
    """The batches' rows as one float32 matrix; (0, dim) when there were none."""
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


def embed_batches(items: Sequence[Any], embed_batch: Callable[[Sequence[Any]], np.ndarray], batch_size: int,
                  bar=None) -> Iterator[tuple[Sequence[Any], np.ndarray]]:
    """(slice, its rows) for consecutive slices of ``batch_size`` items; the bar advances by the
    slice's length once the caller has handled it."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        yield chunk, embed_batch(chunk)
        if bar is not None:
            bar.update(len(chunk))


def embed_in_batches(items: Sequence[Any], embed_batch: Callable[[Sequence[Any]], np.ndarray], batch_size: int,
                     dim: int, bar=None) -> np.ndarray:
    """All of ``embed_batches`` at once: float32 rows in input order."""
    return stack_rows([rows for _, rows in embed_batches(items, embed_batch, batch_size, bar)], dim)


# The first image group's size: one run of onnxruntime's CPU sub-batch (OnnxEmbedder.IMAGE_SUB_BATCH),
# so ramping up keeps every CPU run whole (for a batch size that is a multiple of 4). A GPU or torch
# runs the first groups as smaller batches, whose rows may differ from a whole batch's in the last
# bits. Since the first batch is embedded in the caller's thread, decoding the second overlaps no
# embedding (a few ms a run).
FIRST_GROUP = 4


@dataclass
class ImageBatch:
    decoded: list[Decoded]  # the images embedded, in input order
    vectors: np.ndarray | None  # one row per decoded image; None when the batch holds none
    failed: list[Decoded]  # images that failed since the previous batch, each with its reason
    final: bool  # the last batch of the run (it may hold no images, only failures, or nothing)


def embed_image_batches(paths: Iterable[str], preprocessor, embed_pixels: Callable[[np.ndarray], np.ndarray],
                        batch_size: int, workers: int = 0, bar=None, strict: bool = False) -> Iterator[ImageBatch]:
    """Decode ``paths`` in ``workers`` processes and embed them ``batch_size`` at a time
    (``embed_pixels`` gets uint8 (n, size, size, 3), as ``EmbedderProtocol.embed_pixels`` takes).

    Every image ends up in exactly one batch's ``decoded`` or ``failed``; the bar advances by
    a batch's images once the caller has handled it. ``strict`` raises InputError naming the
    first image that fails, instead of reporting it.

    While the caller handles one batch (the indexer records it in SQLite), the next is already
    being embedded on a second thread: onnxruntime and torch release the GIL, so the engine no
    longer idles between batches (docs/benchmarks.md, "Issue 17, fourth window").
    ``embed_pixels`` is therefore called from that thread, one batch at a time, in order (all but
    the first batch, which runs in the caller's thread).
    """
    # processes keep two batches in flight, so memory stays two batches above what is embedded;
    # with 0 workers this thread decodes the next batch while the embedding thread runs this one
    decoded_stream = decode_images(paths, preprocessor, workers, read_ahead=max(2 * batch_size, 16))
    embedding = ThreadPoolExecutor(1, thread_name_prefix="mmretrieve-embed")
    running: _Embedding | None = None  # the batch on the embedding thread
    started = False
    decoding = True  # taking the next group (where strict raises a decode failure), not handing one over
    try:
        for images, failed, final in _image_groups(decoded_stream, batch_size, strict):
            decoding = False
            vectors = None
            if images and not started:
                # The first batch is embedded here: what an embedder sets up on first use (its
                # weights, torch's thread count, which torch keeps per thread) is set up in the
                # caller's thread, as it was before there was an embedding thread.
                vectors, started = Future(), True
                vectors.set_result(embed_pixels(np.stack([d.pixels for d in images])))
            elif images:
                if running is not None and running.vectors is not None and running.vectors.done():
                    running.vectors.result()  # an engine that failed stops the run before more is queued
                vectors = embedding.submit(embed_pixels, np.stack([d.pixels for d in images]))
            previous, running = running, _Embedding(images, failed, vectors)
            for done in ([previous] if previous else []) + ([running] if final else []):
                yield done.batch(final=done is running)
                if bar is not None:
                    bar.update(len(done.images) + len(done.failed))
            decoding = True
    except InputError:
        # strict: an image after the batch on the embedding thread failed to decode; that batch
        # comes first, so its engine error (if it fails) is the one raised
        error = running.vectors.exception() if decoding and running is not None and running.vectors else None
        if error is not None:
            raise error from None
        raise
    finally:
        if running is not None and running.vectors is not None:
            running.vectors.cancel()
        embedding.shutdown(wait=True)  # a batch already running finishes; nothing else starts
        decoded_stream.close()


class _Embedding(NamedTuple):
    images: list[Decoded]
    failed: list[Decoded]
    vectors: Future | None  # of embed_pixels on the images; None when there are none

    def batch(self, final: bool) -> ImageBatch:
        return ImageBatch(self.images, self.vectors.result() if self.vectors else None, self.failed, final)


def _image_groups(decoded_stream: Iterator[Decoded], batch_size: int,
                  strict: bool) -> Iterator[tuple[list[Decoded], list[Decoded], bool]]:
    """(images, failed since the previous group, final) from the decoded stream: groups of
    ``batch_size`` images, then a final group that may hold fewer, only failures, or nothing.
    The first groups grow from FIRST_GROUP images (4, 8, 16, ...): the engine starts once four
    images are decoded, not a whole batch (23 ms of one core for 32 photos of 224 px), and each
    group embeds for longer than the next one takes to decode."""
    batch: list[Decoded] = []
    failed: list[Decoded] = []
    size = min(batch_size, FIRST_GROUP)
    for image in decoded_stream:
        if image.error:
            if strict:
                raise InputError(f"{image.path}: {image.error}")
            failed.append(image)
        else:
            batch.append(image)
        if len(batch) >= size:
            yield batch, failed, False
            batch, failed = [], []
            size = min(batch_size, 2 * size)
    yield batch, failed, True


def embed_image_paths(paths: Iterable[str], preprocessor, embed_pixels: Callable[[np.ndarray], np.ndarray],
                      batch_size: int, dim: int, workers: int = 0, bar=None,
                      strict: bool = False) -> tuple[np.ndarray, list[Decoded], list[Decoded]]:
    """All of ``embed_image_batches`` at once: (rows of the images embedded, those images, the failed)."""
    rows, embedded, failed = [], [], []
    for batch in embed_image_batches(paths, preprocessor, embed_pixels, batch_size, workers, bar, strict):
        if batch.decoded:
            rows.append(batch.vectors)
            embedded += [Decoded(d.path, None, d.width, d.height, d.sha256) for d in batch.decoded]
        failed += batch.failed
    return stack_rows(rows, dim), embedded, failed


# --- torch towers -------------------------------------------------------------------------------

def auto_device(device=None) -> torch.device:
    """``device`` (default: CUDA when there is one, else the CPU), with "cuda" pinned to the GPU
    this thread uses now (``cuda:N``): "cuda" alone means the current GPU of whichever thread
    runs, and embed_image_batches runs the model on a thread of its own."""
    import torch

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def torch_rows(module, forward: Callable, device=None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function from a batch of preprocessed arrays to float32 rows: ``module`` moved to
    ``device`` (default: the best one) in eval mode, ``forward`` run without autograd."""
    import torch

    device = auto_device(device)
    module.to(device).eval()

    def run(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            inputs = {name: torch.from_numpy(array).to(device) for name, array in arrays.items()}
            return forward(inputs).float().cpu().numpy()

    return run


def embed_batched(items: Sequence[Any], preprocess: Callable, forward: Callable, module, dim: int, unit: str,
                  batch_size: int = 32, device=None, progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Preprocess and run ``items`` (texts, or images as paths or PIL images) batch by batch."""
    run = torch_rows(module, forward, device)
    with progress_bar(total=len(items), unit=unit, disable=not progress, desc=desc) as bar:
        return embed_in_batches(items, lambda chunk: run(preprocess(chunk)), batch_size, dim, bar)


def tower_features(encoder, inputs: list, batch_size: int, device, workers: int = 0, forward=None,
                   progress: bool = True) -> np.ndarray:
    """Raw features of a tower in eval mode; images are decoded in ``workers`` processes, and one
    that cannot be used stops the run with an InputError naming it."""
    forward = forward or encoder.forward
    desc = f"{encoder.modality} features"
    if encoder.modality == "text":
        return embed_batched(inputs, encoder.preprocess, forward, encoder.module, encoder.dim, "text", batch_size,
                             device, progress, desc=desc)
    run = torch_rows(encoder.module, forward, device)
    with progress_bar(total=len(inputs), unit="image", desc=desc, disable=not progress) as bar:
        # the pool sends uint8 pixels; the tower takes them normalised (bit for bit its preprocess)
        features, _, _ = embed_image_paths(
            inputs, encoder.preprocessor, lambda pixels: run({"pixel_values": encoder.preprocessor.normalize(pixels)}),
            batch_size, encoder.dim, workers, bar, strict=True)
    return features


def tower_cache_path(cache_dir: Path, label: str, fingerprint: str, inputs: list) -> Path:
    """Where ``cached_tower_features`` keeps the features of ``inputs``."""
    key = hashlib.sha256((fingerprint + "\n" + "\n".join(map(str, inputs))).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{label}-{key}.npy"


def cached_tower_features(encoder, inputs: list, cache_dir: Path | None, batch_size: int, device, label: str,
                          fingerprint: str, workers: int = 0) -> torch.Tensor:
    """Raw (pre-head) features of a frozen tower for every input, computed once per
    (weights, preprocessing, inputs) and kept on disk so resumed runs skip the work."""
    import torch

    path = tower_cache_path(cache_dir, label, fingerprint, inputs) if cache_dir else None
    if path is not None and path.is_file():
        features = np.load(path)
        if features.shape == (len(inputs), encoder.dim):
            log.info("using cached %s features from %s", label, path)
            return torch.from_numpy(features)
    features = tower_features(encoder, inputs, batch_size, device, workers)
    if path is not None:
        write_npy_atomic(path, features)
    return torch.from_numpy(features)


def cached_view_features(encoder, inputs: list, cache_dir: Path, batch_size: int, device, label: str,
                         fingerprint: str, views: int, settings: ViewAugmentation, workers: int = 0) -> torch.Tensor:
    """Raw features of a frozen image tower for ``views`` views of every image (``mmretrieve.augment``:
    view 0 plain, the others augmented): float32 (images, views, dim), computed once per (weights,
    preprocessing, augmentation, views, inputs) and kept on disk.

    Each file is decoded once for all its views; ``batch_size`` counts tower rows (views). Rows are
    written to a memory-mapped file as they come, so memory holds a few batches of pixels, never the
    decoded collection; the finished file replaces the cache entry atomically. When the folder holds
    the plain features of the same inputs (``cached_tower_features``, a one-view run's cache), they
    are view 0 and the tower runs only for the augmented views.
    """
    import torch

    key = hashlib.sha256("\n".join([fingerprint, settings.key(), f"views={views}", *map(str, inputs)]).encode())
    path = Path(cache_dir) / f"{label}-views{views}-{key.hexdigest()[:16]}.npy"
    shape = (len(inputs), views, encoder.dim)
    if path.is_file():
        features = np.load(path)
        if features.shape == shape:
            log.info("using cached %s features of %d views from %s", label, views, path)
            return torch.from_numpy(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        first = 0
        plain_path = tower_cache_path(cache_dir, label, fingerprint, inputs)
        if views > 1 and plain_path.is_file():  # views == 1 would leave the loop below no view to run
            plain = np.load(plain_path, mmap_mode="r")
            if plain.shape == (len(inputs), encoder.dim):
                log.info("view 0 of %s: the plain features cached in %s", label, plain_path)
                out[:, 0], first = plain, 1
            del plain
        computed = views - first
        run = torch_rows(encoder.module, encoder.forward, device)
        per_call = max(1, batch_size // computed)  # images per tower call
        decoded = ordered_map(decode_views, inputs, workers, initializer=init_views,
                              initargs=(encoder.preprocessor, views, settings, first), read_ahead=max(2 * per_call, 8))
        row, batch = 0, []
        desc = f"image features, {views} views" + (" (view 0 cached)" if first else "")
        with contextlib.closing(decoded), progress_bar(total=len(inputs), unit="image", desc=desc) as bar:
            for image in decoded:
                if image.error:
                    raise InputError(f"{image.path}: {image.error}")
                batch.append(image.pixels)
                if len(batch) == per_call or row + len(batch) == len(inputs):
                    pixels = np.concatenate(batch)  # (images * computed views, size, size, 3)
                    rows = run({"pixel_values": encoder.preprocessor.normalize(pixels)})
                    out[row:row + len(batch), first:] = rows.reshape(len(batch), computed, -1)
                    row += len(batch)
                    bar.update(len(batch))
                    batch = []
        out.flush()
        del out
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return torch.from_numpy(np.load(path))


def _remove_stale_tmp(path: Path) -> None:
    """Delete the ``.NAME.PID.tmp`` files of ``path`` whose writer is gone (a killed run leaves a
    full views array, hundreds of MB, that nothing else removes); a live writer's file stays."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by a run that is gone", tmp)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
