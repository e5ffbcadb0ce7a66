"""Augmented views of a training image, for heads trained on a frozen tower's cached features.

``ViewAugmentation`` holds the settings: a random resized crop (a share of the image's area and an
aspect ratio, as torchvision's RandomResizedCrop draws them, the crop squashed to a square as CLIP
and open_clip training do) and an optional left-right flip. It works on the decoded PIL image,
before the tower's own preprocessing (resize, centre crop, normalise), so it suits any image
encoder. ``view_pixels`` makes one image's views: view 0 is the plain preprocessing (what
validation and indexing see), views 1.. are augmented. Each view is drawn from a generator seeded
by the image file's SHA-256 and the view number, so a cache of views is reproducible, independent
of the data's order and of the training seed, and view k is the same whatever the number of views.
``decode_views`` reads a file once and returns all its views, for ``mmretrieve.decode.ordered_map``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .decode import Decoded, decode_file
from .errors import ConfigError

# torchvision's RandomResizedCrop tries this many draws before falling back to a centre crop.
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class ViewAugmentation:
    scale: tuple[float, float] = (0.6, 1.0)  # share of the image's area a crop covers, drawn uniformly
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, drawn log-uniformly
    flip: bool = True  # mirror half of the views left-right

    def __post_init__(self) -> None:
        scale, ratio = _pair(self.scale), _pair(self.ratio)
        if scale is None or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"image_view_scale must be [min, max] with 0 < min <= max <= 1, not {self.scale!r}")
        if ratio is None or not 0.0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"image_view_ratio must be [min, max] with 0 < min <= max, not {self.ratio!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip", bool(self.flip))

    def key(self) -> str:
        """The settings as text, for the key of a cache of views."""
        return f"rrc scale={self.scale!r} ratio={self.ratio!r} flip={self.flip} squash bicubic v1"


def _pair(value) -> tuple[float, float] | None:
    """Two numbers as floats, or None when ``value`` is not two numbers."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        pair = tuple(float(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError):
        return None
    return pair if len(pair) == 2 and len(value) == 2 else None


def view_rng(digest: str, view: int) -> np.random.Generator:
    """The generator of one view of one image: seeded by the file's SHA-256 (hex) and the view."""
    return np.random.default_rng([int(digest[:32], 16), view])


def crop_box(width: int, height: int, settings: ViewAugmentation,
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_lo, log_hi = math.log(settings.ratio[0]), math.log(settings.ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*settings.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # A very long image: the largest centred crop whose aspect ratio is within range.
    aspect = width / height
    if aspect < settings.ratio[0]:
        w, h = width, int(round(width / settings.ratio[0]))
    elif aspect > settings.ratio[1]:
        w, h = int(round(height * settings.ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, settings: ViewAugmentation, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``image`` squashed to a square of about the crop's area (so the tower's
    centre crop keeps the whole of it, its aspect ratio changed as RandomResizedCrop's output is),
    flipped left-right with probability 1/2 when ``settings.flip``."""
    left, top, right, bottom = crop_box(image.width, image.height, settings, rng)
    side = max(1, int(round(math.sqrt((right - left) * (bottom - top)))))
    view = image.resize((side, side), Image.Resampling.BICUBIC, box=(left, top, right, bottom))
    # Drawn even without flip, so a view's crop does not depend on the flip setting.
    if rng.random() < 0.5 and settings.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def view_pixels(image: Image.Image, digest: str, views: int, preprocessor, settings: ViewAugmentation,
                first: int = 0) -> np.ndarray:
    """uint8 (views - first, size, size, 3): views ``first`` to ``views - 1`` of the image, the
    preprocessor's ``resize_crop`` of the image itself (view 0) or of an augmentation of it. A
    preprocessor with only ``transform`` gives its output instead, as ``decode.decode_one`` does."""
    prepare = getattr(preprocessor, "resize_crop", None) or preprocessor.transform
    out = []
    for view in range(first, views):
        source = image if view == 0 else augment(image, settings, view_rng(digest, view))
        out.append(prepare(source))
    return np.stack(out)


_worker: tuple | None = None  # (preprocessor, views, settings, first), set in each pool worker by init_views


def init_views(preprocessor, views: int, settings: ViewAugmentation, first: int = 0) -> None:
    """Pool initialiser for ``decode_views``: what it works with in this worker (views from ``first``)."""
    global _worker
    _worker = (preprocessor, views, settings, first)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def decode_views(path: str) -> Decoded:
    """Read and decode the file once (``decode_file``); ``pixels`` are its ``view_pixels``."""
    preprocessor, views, settings, first = _worker
    return decode_file(path, lambda image, sha256: view_pixels(image, sha256, views, preprocessor, settings, first))
