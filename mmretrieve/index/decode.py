"""Decoding and preprocessing images in worker processes, in order, with bounded read-ahead."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..images import ImageInputError, load_image, read_image_file

_preprocessor = None  # set in each worker by _init_worker


@dataclass
class Decoded:
    path: str
    pixels: np.ndarray | None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None


def _init_worker(preprocessor) -> None:
    global _preprocessor
    _preprocessor = preprocessor
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def decode_one(path: str, preprocessor=None) -> Decoded:
    """Read the file once: hash its bytes, decode, preprocess. Never raises: any failure
    (a special or oversized file, a corrupt image, running out of memory) becomes a reason."""
    preprocessor = preprocessor or _preprocessor
    digest = None
    try:
        data = read_image_file(path)
        digest = hashlib.sha256(data).hexdigest()
        image = load_image(data, name=path)
        del data
        width, height = image.info.get("source_size", image.size)
        return Decoded(path, preprocessor.transform(image), width, height, digest)
    except ImageInputError as exc:
        return Decoded(path, None, sha256=digest, error=exc.reason)
    except MemoryError:
        return Decoded(path, None, sha256=digest, error="ran out of memory while decoding it")
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a run of thousands
        return Decoded(path, None, sha256=digest, error=f"could not be decoded ({type(exc).__name__}: {exc})")


def ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int, initializer=None,
                initargs=(), read_ahead: int = 64) -> Iterator[Any]:
    """``map`` over worker processes: results in input order, at most ``read_ahead`` pending
    (so decoded images never pile up faster than the encoder consumes them)."""
    if workers <= 0:
        if initializer:
            initializer(*initargs)
        yield from map(function, items)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= read_ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
