"""The one decoding pool: images read, decoded and preprocessed in workers, in input order.

``decode_images(paths, preprocessor, workers)`` is what every reader uses (the indexer, eval,
``mmretrieve embed``, training's feature cache; a Ray actor calls ``decode_one`` per image):
each path becomes a ``Decoded`` with its pixels, or with the reason it could not be used;
nothing raises. Pixels are the resized, cropped image as uint8
(``ImagePreprocessor.resize_crop``): a quarter of the float32 bytes to send from a worker; the
embedder normalises them (in the ONNX graph, or ``ImagePreprocessor.normalize``).
``ordered_map`` is the pool underneath: worker processes (the Python around each decode holds
the GIL, so several decoders need processes), or none for 0 workers: the caller's thread decodes
while ``embedding.embed_image_batches`` embeds the previous batch on a thread of its own.
Only regular files under the size limit of ``mmretrieve.images`` are read.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .images import ImageInputError, load_image, read_image_file

_preprocessor = None  # set in each worker process by init_worker


@dataclass
class Decoded:
    path: str
    pixels: np.ndarray | None  # uint8 (size, size, 3) from ImagePreprocessor.resize_crop (or a transform's output)
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None  # why the image cannot be used; pixels is None then


def init_worker(preprocessor) -> None:
    """Pool initialiser: the preprocessor ``decode_one`` uses in this worker, one thread of math each."""
    global _preprocessor
    _preprocessor = preprocessor
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def decode_one(path: str, preprocessor=None) -> Decoded:
    """``decode_file`` with the pixels resized and cropped to uint8 (the preprocessor's ``resize_crop``)."""
    preprocessor = preprocessor or _preprocessor

    def resize_crop(image, sha256: str) -> np.ndarray:
        # A runtime's own preprocessor may have only ``transform`` (the contract before uint8): its
        # output is sent as it is, and embed_pixels takes it as it always did.
        return (getattr(preprocessor, "resize_crop", None) or preprocessor.transform)(image)

    return decode_file(path, resize_crop)


def decode_file(path: str, make_pixels: Callable[[Any, str], np.ndarray]) -> Decoded:
    """Read the file once: hash its bytes, decode it, and make its pixels with
    ``make_pixels(image, sha256)``. Never raises: any failure (a special or oversized file, a
    corrupt image, running out of memory) becomes a reason."""
    digest = None
    try:
        data = read_image_file(path)
        digest = hashlib.sha256(data).hexdigest()
        image = load_image(data, name=path)
        del data
        width, height = image.info.get("source_size", image.size)
        return Decoded(path, make_pixels(image, digest), width, height, digest)
    except ImageInputError as exc:
        return Decoded(path, None, sha256=digest, error=exc.reason)
    except MemoryError:
        return Decoded(path, None, sha256=digest, error="ran out of memory while decoding it")
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a run of thousands
        return Decoded(path, None, sha256=digest, error=f"could not be decoded ({type(exc).__name__}: {exc})")


def decode_images(paths: Iterable[str], preprocessor, workers: int = 0, read_ahead: int = 64) -> Iterator[Decoded]:
    """``decode_one`` over ``paths`` in ``workers`` processes, results in input order. With 0 workers
    the caller's thread decodes each image as it is taken: ``embed_image_batches`` takes them while
    its embedding thread embeds the batch before, so decoding overlaps the engine without a pool
    (on 2 cores 0.99x-1.05x the images/s of a pool thread decoding ahead, which did the same with
    a hand-over per image, in three interleaved runs; docs/benchmarks.md "Issue 17, fourth window")."""
    if workers <= 0:
        return (decode_one(path, preprocessor) for path in paths)
    return ordered_map(decode_one, paths, workers, initializer=init_worker, initargs=(preprocessor,),
                       read_ahead=read_ahead)


def ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int, initializer=None,
                initargs=(), read_ahead: int = 64, threads: bool = False) -> Iterator[Any]:
    """``map`` over a pool of worker processes (or ``threads``): results in input order, at most
    ``read_ahead`` pending (so decoded images never pile up faster than they are consumed).
    Closing the iterator early (or an exception in the consumer) stops the pool."""
    if workers <= 0:
        if initializer:
            initializer(*initargs)
        yield from map(function, items)
        return
    pool_class = ThreadPool if threads else multiprocessing.get_context("fork").Pool
    with pool_class(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= read_ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
