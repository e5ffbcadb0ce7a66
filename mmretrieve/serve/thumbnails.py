"""Thumbnails: made once with Pillow, kept on disk, served from there afterwards.

A thumbnail's name is a hash of the item's content hash (from the index), the file's size and
mtime as they are now, and the thumbnail settings, so an edited photo gets a new thumbnail and
identical photos share one. Files are written atomically (temporary name, then rename): two
requests racing to make the same thumbnail both succeed, and a reader never sees half a JPEG.
Nothing is evicted; at the default 320 px a thumbnail is 10-25 KB, so 10,000 photos take ~200 MB.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from ..atomic import write_bytes_atomic
from ..images import to_rgb
from .problems import RequestProblem

FORMAT_VERSION = 2  # bump when the way thumbnails are made changes, to retire old files
QUALITY = 82


class ThumbnailCache:
    def __init__(self, folder: Path, size: int, max_pixels: int):
        self.folder = Path(folder)
        self.size = size
        self.max_pixels = max_pixels

    def key(self, content: str, info: os.stat_result) -> str:
        """``content``: the item's SHA-256 from the index (its path where the index has none)."""
        text = f"{content}:{info.st_size}:{info.st_mtime_ns}:{self.size}:{QUALITY}:{FORMAT_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.jpg"

    def cached(self, key: str) -> Path | None:
        path = self.path(key)
        return path if path.is_file() else None

    def make(self, key: str, handle: BinaryIO) -> Path:
        """Write the thumbnail of an opened image file under ``key`` and return its path."""
        path = self.path(key)
        write_bytes_atomic(path, render_thumbnail(handle, self.size, self.max_pixels))
        return path


def render_thumbnail(handle: BinaryIO, size: int, max_pixels: int) -> bytes:
    """JPEG bytes of the image scaled to fit ``size`` x ``size``, upright, on white where transparent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                if image.width * image.height > max_pixels:
                    raise RequestProblem(422, f"the image has more than {max_pixels} pixels; no thumbnail is made")
                image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale directly
                image.seek(0)
                oriented = ImageOps.exif_transpose(image)
                if oriented.mode == "F" or oriented.mode.startswith("I"):
                    oriented = to_rgb(oriented)  # scaled to 8 bits first: Pillow cannot resample I;16
                oriented.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
                picture = to_rgb(oriented)  # transparency on white, as the search sees the image
    except RequestProblem:
        raise
    except Exception:  # noqa: BLE001 - whatever Pillow raises on a file that changed or broke
        raise RequestProblem(422, "this file can no longer be read as an image") from None
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=QUALITY, optimize=True, progressive=True)
    return out.getvalue()

