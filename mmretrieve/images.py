"""Opening user images safely, and turning every colour mode into the RGB a model sees.

Reading: a path is opened without blocking and checked on the opened descriptor, so only a
regular file is read (a FIFO, a socket, a device such as ``/dev/zero`` or a folder is refused
with its reason instead of hanging or filling memory), and at most ``MAX_FILE_BYTES`` of it.

Decoding: the first frame (animated GIF/WebP), upright as the camera saw it (EXIF), refused
before its pixels are decoded when it has more than ``max_pixels`` pixels (a decompression
bomb) or a shape no photo has (``MAX_ASPECT``). JPEGs of more than ``DRAFT_PIXELS`` pixels are
decoded at a reduced scale (1/2 to 1/8, never below ``DRAFT_SIDE`` on the shorter side). Other
formats (PNG, WebP, TIFF, ...) cannot be decoded reduced; one that is not RGB already and has
both sides at least twice ``DRAFT_SIDE`` is reduced right after decoding, by the integer factor
that keeps at least ``DRAFT_SIDE`` pixels on the shorter side, and the full decode freed, so the
colour conversion's copies (transparency on white: three of them) are of the small image (a
60-megapixel RGBA PNG peaked at 766 MB, now 505 MB; an RGB one needs no conversion and stays at
250 MB). Palette, 1-bit and 16-bit grey images (at most two bytes a pixel as decoded) are not
reduced; Pillow's decompression-bomb limit (89 megapixels) bounds every format.

Colour (``to_rgb``):
- 16-bit and 32-bit integer grey (``I;16``, ``I``) is scaled to 8 bits (65535 -> 255), never
  clipped; integer values outside 0..65535 and float images (``F``) outside 0..1 are stretched
  from their minimum to their maximum. 16-bit RGB(A) PNGs and TIFFs already open as 8-bit.
- Transparency (RGBA, LA, PA, a palette with a transparent colour) is composited on white,
  as browsers and the service's thumbnails show it; a fully opaque alpha changes nothing.
- Everything else (L, P, CMYK, YCbCr, 1, ...) goes through Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A 16k x 16k photo; larger files are refused instead of exhausting memory.
MAX_PIXELS = 268_435_456
# Files larger than this are not read: 256 MB is 5x the largest camera JPEG or 16-bit PNG of a
# 48-megapixel photo, and bounds what one decoding worker holds in memory.
MAX_FILE_BYTES = 256 << 20
# Longer side / shorter side beyond which an image is refused: a 360-degree panorama is 2:1 to
# about 12:1, so 20:1 passes every photo while 1x16000 strips (which once took gigabytes to
# preprocess) are refused before their pixels are decoded.
MAX_ASPECT = 20.0
# JPEGs above this many pixels (beyond every camera but 100+-megapixel modes) are decoded at a
# reduced DCT scale, keeping at least DRAFT_SIDE pixels on the shorter side (8x a 256 px input).
DRAFT_PIXELS = 64_000_000
DRAFT_SIDE = 2048
# Modes that to_rgb copies and Image.reduce averages correctly (not palette indices, 1-bit, 16-bit).
_REDUCIBLE = frozenset({"L", "LA", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})

_FILE_KINDS = ((stat.S_ISDIR, "is a folder, not an image"),
               (stat.S_ISFIFO, "is a FIFO (named pipe), not an image file"),
               (stat.S_ISSOCK, "is a socket, not an image file"),
               (stat.S_ISCHR, "is a device, not an image file"),
               (stat.S_ISBLK, "is a device, not an image file"))


class ImageInputError(InputError):
    """An image that cannot be used; ``reason`` is the message without the file's name."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label, self.reason = label, reason


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def special_file_reason(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read as an image (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return next((reason for test, reason in _FILE_KINDS if test(mode)), "is not a regular file")


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` (links followed) cannot be read as an image file, without opening it; None if it can."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return special_file_reason(info.st_mode) or (_too_big(info.st_size) if info.st_size > MAX_FILE_BYTES else None)


def _too_big(size: int, limit: int = MAX_FILE_BYTES) -> str:
    return f"over the {limit / (1 << 20):g} MB limit for an image file ({size} bytes)"


def read_image_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ImageInputError for anything else.

    The file is opened non-blocking (a FIFO does not wait for a writer) and checked on the opened
    descriptor, so what was checked is what is read; at most ``limit + 1`` bytes are ever read.
    """
    label = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageInputError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageInputError(label, "is a folder, not an image") from None
    except OSError as exc:
        raise ImageInputError(label, f"unreadable ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        reason = special_file_reason(info.st_mode) or (_too_big(info.st_size, limit) if info.st_size > limit else None)
        if reason:
            raise ImageInputError(label, reason)
        chunks, left = [], limit + 1
        want = min(left, info.st_size + 1)  # usually the whole file in one read, so no copy is joined
        while left > 0:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
            want = min(left, 1 << 20)
    except OSError as exc:
        raise ImageInputError(label, f"unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # it grew after the check
        raise ImageInputError(label, _too_big(len(data), limit))
    return data


def check_shape(width: int, height: int, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> str | None:
    """Why an image of this size is refused (too many pixels, an absurd aspect ratio), or None."""
    if width * height > max_pixels:
        return f"{width}x{height} exceeds the {max_pixels}-pixel limit"
    if width < 1 or height < 1:
        return f"{width}x{height} has no pixels"
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect:
        return (f"{width}x{height} has an aspect ratio of {ratio:.0f}:1, beyond the {max_aspect:g}:1 "
                f"that any photo or panorama stays within")
    return None


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS,
               name: str | None = None, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Return an RGB image upright as the camera saw it, or raise ImageInputError with the reason.

    ``source`` is a path, a PIL image, or the file's bytes (then ``name`` labels messages).
    ``image.info["source_size"]`` is the upright size of the stored image (which differs from
    ``image.size`` only for a JPEG decoded at a reduced scale).
    """
    if isinstance(source, Image.Image):
        label = name or "<image>"
        problem = check_shape(source.width, source.height, max_pixels, max_aspect)
        if problem:
            raise ImageInputError(label, problem)
        return to_rgb(source, label)
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    data = source if isinstance(source, bytes) else read_image_file(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                problem = check_shape(image.width, image.height, max_pixels, max_aspect)
                if problem:
                    raise ImageInputError(label, problem)
                image.seek(0)  # animated GIF/WebP: the first frame
                size = image.size
                if image.format == "JPEG" and size[0] * size[1] > DRAFT_PIXELS:
                    factor = DRAFT_SIDE / min(size)
                    image.draft(None, (max(1, int(size[0] * factor)), max(1, int(size[1] * factor))))
                image.load()  # decode now so truncated files fail here, not later
                factor = min(image.size) // DRAFT_SIDE
                if image.format != "JPEG" and factor >= 2 and image.mode in _REDUCIBLE:
                    full, image = image, image.reduce(factor)
                    full.close()  # its pixels are freed now, not when the with block ends (module doc)
                # Both steps copy the pixels, so skip them when there is nothing to change.
                orientation = image.getexif().get(0x0112, 1)
                if orientation != 1:
                    image = ImageOps.exif_transpose(image)
                    if orientation in (5, 6, 7, 8):
                        size = size[::-1]
                result = to_rgb(image, label)
                result.info["source_size"] = size
                return result
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(label, "not an image file Pillow can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageInputError(label, f"refused as a decompression bomb ({exc})") from None
    except MemoryError:
        raise ImageInputError(label, "ran out of memory while decoding it") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageInputError(label, f"unreadable image ({exc})") from None
    except Exception as exc:  # a Pillow plugin tripping over malformed bytes: still the file's fault
        raise ImageInputError(label, f"unreadable image ({type(exc).__name__}: {exc})") from None


def to_rgb(image: Image.Image, label: str = "<image>") -> Image.Image:
    """8-bit RGB of any Pillow mode: high bit depths scaled, transparency on white (module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F" or mode.startswith("I"):
        return _scaled_to_8_bits(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:  # opaque: exactly what dropping alpha gives
            return rgba.convert("RGB")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=alpha)
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(label, f"colour mode {mode} cannot be converted to RGB ({exc})") from None


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """An L image from an integer (``I;16*``, ``I``, ``I;32*``) or float (``F``) grey image."""
    import numpy as np

    values = np.asarray(image).astype(np.float32)  # exact for 16-bit values
    finite = np.isfinite(values)
    values[~finite] = 0.0
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and 0.0 <= low and high <= 65535.0:
        scaled = values / 257.0  # 65535 -> 255, 257 -> 1
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def list_images(root: Path) -> list[Path]:
    """Image files below a folder (or the file itself), sorted, hidden entries skipped."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or folder")
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and is_image_path(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
