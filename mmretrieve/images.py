"""Opening user images safely: EXIF orientation, first frame, RGB, decompression-bomb guard."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A 16k x 16k photo; larger files are refused instead of exhausting memory.
MAX_PIXELS = 268_435_456


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """Return an RGB image upright as the camera saw it, or raise InputError with the reason.

    ``source`` is a path, a PIL image, or the file's bytes (then ``name`` labels messages).
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                if image.width * image.height > max_pixels:
                    raise InputError(f"{label}: {image.width}x{image.height} exceeds the {max_pixels}-pixel limit")
                image.seek(0)  # animated GIF/WebP: the first frame
                image.load()  # decode now so truncated files fail here, not later
                # Both steps copy the pixels, so skip them when there is nothing to change.
                if image.getexif().get(0x0112, 1) != 1:
                    image = ImageOps.exif_transpose(image)
                return image if image.mode == "RGB" else image.convert("RGB")
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(f"{label}: unreadable image ({exc})") from None


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
