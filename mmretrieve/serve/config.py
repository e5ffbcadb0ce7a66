"""What the HTTP service needs to know, gathered in one place (the CLI fills it from flags and env)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Uploads are decoded in memory; 40 MP (an 8k x 5k photo) is ~120 MB of RGB pixels, so a
# few concurrent uploads cannot exhaust a small server. Indexing keeps its own, higher limit.
DEFAULT_MAX_PIXELS = 40_000_000
THUMB_CACHE_ENV = "MMRETRIEVE_THUMB_CACHE"


def default_thumb_cache() -> Path:
    """$MMRETRIEVE_THUMB_CACHE, else $XDG_CACHE_HOME/mmretrieve/thumbs (~/.cache/...)."""
    if os.environ.get(THUMB_CACHE_ENV):
        return Path(os.environ[THUMB_CACHE_ENV])
    from ..plugins import cache_dir

    return cache_dir() / "thumbs"


@dataclass
class ServeConfig:
    index_dir: Path  # the image index (`mmretrieve index` output) searched by text and by image
    text_index_dir: Path | None = None  # a caption index (`mmretrieve index --texts`) for image->text
    model: str | None = None  # model to embed queries with; default: the one that built the index
    runtime: str = "auto"  # torch, onnx, auto (onnx for an export folder) or a registered runtime
    device: str | None = None  # torch/onnx device; default: cuda when present
    api_key: str | None = None  # when set, /api, /file and /thumb need it (X-API-Key, Bearer or cookie)
    roots: tuple[Path, ...] = ()  # folders files may be served from; default: the indexed folders (manifest roots)
    max_upload_bytes: int = 20 << 20  # request bodies of image searches beyond this get 413
    max_pixels: int = DEFAULT_MAX_PIXELS  # uploads with more pixels get 413 (decompression bombs)
    max_k: int = 100  # largest k a request may ask for
    max_query_chars: int = 1000  # longer text queries get 422
    thumb_cache: Path = field(default_factory=default_thumb_cache)  # where generated thumbnails are kept
    thumb_size: int = 320  # longest side of a thumbnail, in pixels
    thumb_workers: int = 2  # thumbnails decoded at once (each holds a full-size image in memory)
    max_batch: int = 32  # queries embedded and searched together when requests queue up
    max_queued: int = 1024  # queries waiting beyond this get 503 (overload), rather than unbounded memory
    reload_interval: float = 2.0  # seconds between checks for a newly published index generation
    compute_threads: int | None = None  # threads for embedding and FAISS; None: the runtimes' own default


def default_compute_threads() -> int:
    """One core fewer than the process may use: the event loop, uploads and thumbnails need one.
    With every core given to torch's OpenMP pool, its spinning threads and the server's own
    threads preempt each other; on 2 cores that cut throughput by 5x (docs/serving.md)."""
    from ..threads import policy_for

    return policy_for("serve").compute
