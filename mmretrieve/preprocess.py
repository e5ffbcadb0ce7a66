"""Turning texts and images into model inputs with NumPy, Pillow and tokenizers only.

The torch and onnxruntime paths use these same functions, so the two runtimes see
identical inputs and the ONNX path never needs PyTorch.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

# Pillow (and mmretrieve.images) are imported with the first image, not with this module: a
# text query builds both preprocessors but never decodes an image.

# The full resize-then-crop runs while it makes at most this many times the output's pixels.
BOUNDED_ABOVE = 4
RESIZE_MODES = ("crop", "squash")
CROP_OFFSETS = ("round", "floor")
PADDING_MODES = ("longest", "max_length")


@functools.cache
def _pil_interpolation() -> dict:
    """Pillow's resampling filter for each ``interpolation`` name."""
    from PIL import Image

    return {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
    }


def __getattr__(name: str):
    if name == "_PIL_INTERPOLATION":  # the table under its former module-level name
        return _pil_interpolation()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ImagePreprocessConfig:
    size: int = 224  # side of the square crop the model sees
    crop_pct: float = 0.875  # resize the shorter side to size / crop_pct, then centre-crop
    interpolation: str = "bicubic"  # bicubic, bilinear, nearest or lanczos
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel, after scaling to [0, 1]
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "crop"  # crop: shorter side to size / crop_pct, centre crop; squash: whole image to size x size
    crop_offset: str = "round"  # an odd margin's half: round (torchvision, timm) or floor (transformers' processors)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"image resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.crop_offset not in CROP_OFFSETS:
            raise ConfigError(f"image crop_offset must be one of {CROP_OFFSETS}, not {self.crop_offset!r}")

    @classmethod
    def from_timm(cls, data_config: dict) -> "ImagePreprocessConfig":
        _, height, width = data_config["input_size"]
        return cls(size=int(height), crop_pct=float(data_config.get("crop_pct", 0.875)),
                   interpolation=str(data_config.get("interpolation", "bicubic")),
                   mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))


@functools.lru_cache(maxsize=4096)  # photos come in a few sizes; Fraction arithmetic is ~20 us
def _exact_crop(source: int, resized: int, offset: int, size: int) -> tuple[float, float] | None:
    """The crop ``[offset, offset + size)`` of an axis resized from ``source`` to ``resized``
    pixels, in source coordinates, when resampling only it gives the whole axis's values there:
    Pillow takes a box as float32, so the scale and both ends must be exact in float32 (then every
    filter centre is the same double). A square photo's axes are (scale 256 at 224/0.875)."""
    ratio = Fraction(source, resized)
    start, end = offset * ratio, (offset + size) * ratio
    if all(Fraction(float(np.float32(value))) == value for value in (ratio, start, end, end - start)):
        return float(start), float(end)
    return None


def _horizontal_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    """Whether Pillow resamples rows before columns for this resize: the order rounds differently,
    so a crop-only resize must take the order of the whole one. Pillow 13 runs the columns first
    when the height shrinks more than twice as much as the width; earlier versions never do."""
    if _pillow_major() < 13:
        return True
    shrink = height - out_h
    return not (shrink > 0 and shrink > 2 * (width - out_w))


@functools.cache
def _pillow_major() -> int:
    from PIL import __version__

    return int(__version__.split(".")[0])


class ImagePreprocessor:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: timm's eval transform (and
    CLIP's, with crop_pct 1); or, with resize "squash", the whole image to the square (SigLIP's)."""

    file_name = "image_preprocess.json"

    def __init__(self, config: ImagePreprocessConfig):
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1)
        self._std = np.asarray(config.std, dtype=np.float32).reshape(3, 1)
        # Every value a channel's byte can become, computed with exactly the float32 operations of
        # the float path (scale to [0, 1], subtract the mean, divide by the std), so a lookup in
        # it is bit-identical to converting and normalising each pixel (as the ONNX graph of
        # mmretrieve.export does with the same operations).
        self.table = (np.arange(256, dtype=np.float32)[None, :] / 255.0 - self._mean) / self._std

    def transform(self, image: Image.Image) -> np.ndarray:
        """(3, size, size) float32 of an RGB image: ``normalize(resize_crop(image))``."""
        return self.normalize(self.resize_crop(image))

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """(size, size, 3) uint8 of an RGB image, resized and cropped: what the decode workers
        send (a quarter of the float32 bytes); ``normalize`` makes the model's input of it.

        Memory is bounded by the output: when resizing the whole image would make more than
        ``BOUNDED_ABOVE`` times the output's pixels (a panorama, a thin strip), only the centre
        region that survives the crop is resampled, straight from the source.
        """
        size = self.config.size
        if self.config.resize == "squash":  # the aspect ratio is not kept; nothing is cut away
            return np.asarray(image.resize((size, size), _pil_interpolation()[self.config.interpolation]),
                              dtype=np.uint8)
        scale = math.floor(size / self.config.crop_pct)
        width, height = image.size
        # Same arithmetic as torchvision's Resize and CenterCrop, so outputs match timm exactly.
        if width <= height:
            new_w, new_h = scale, int(scale * height / width)
        else:
            new_w, new_h = int(scale * width / height), scale
        if self.config.crop_offset == "floor":
            left, top = (new_w - size) // 2, (new_h - size) // 2
        else:
            left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        resample = _pil_interpolation()[self.config.interpolation]
        if new_w * new_h <= BOUNDED_ABOVE * size * size:
            # Every ordinary photo (up to 3:1 at 224/0.875): bit-identical to timm's transform. An
            # axis whose crop Pillow resamples exactly as the whole axis is resampled only over the
            # crop (a square photo at 224/0.875: 0.77x the pixels, 0.55 ms against 0.74 ms).
            across = _exact_crop(width, new_w, left, size)
            down = _exact_crop(height, new_h, top, size)
            out_w, out_h = (size if across else new_w), (size if down else new_h)
            if (across or down) and _horizontal_first(width, height, out_w, out_h) == \
                    _horizontal_first(width, height, new_w, new_h):
                x0, x1 = across or (0, width)
                y0, y1 = down or (0, height)
                image = image.resize((out_w, out_h), resample, box=(x0, y0, x1, y1))
                left, top = (0 if across else left), (0 if down else top)
            else:
                image = image.resize((new_w, new_h), resample)
            if image.size != (size, size):
                image = image.crop((left, top, left + size, top + size))
        else:
            # The crop box in source coordinates; Pillow resamples it (reading filter support
            # from beyond the box, as the full resize would), so nothing larger is ever made.
            sx, sy = width / new_w, height / new_h
            image = image.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx,
                                                               (top + size) * sy))
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) or (h, w, 3) from ``resize_crop`` -> the model's float32 input,
        (n, 3, h, w) or (3, h, w): bit for bit what converting to float, scaling to [0, 1] and
        normalising each channel gives (a lookup in ``table``)."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
            raise ValueError(f"normalize takes uint8 (..., h, w, 3) pixels, not {pixels.dtype} {pixels.shape}")
        single = pixels.ndim == 3
        batch = pixels[None] if single else pixels
        out = np.empty((batch.shape[0], 3) + batch.shape[1:3], dtype=np.float32)
        for channel in range(3):
            out[:, channel] = self.table[channel][batch[..., channel]]
        return out[0] if single else out

    def to_uint8(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised float32 (n, 3, h, w) back to uint8 (n, h, w, 3): exact for pixels that
        ``normalize`` made (for a graph that takes uint8); other values go to the nearest byte."""
        pixels = np.asarray(pixels, dtype=np.float32)
        values = (pixels * self._std.reshape(1, 3, 1, 1) + self._mean.reshape(1, 3, 1, 1)) * np.float32(255.0)
        return np.ascontiguousarray(np.clip(np.rint(values), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))

    def __call__(self, items: Sequence) -> dict[str, np.ndarray]:
        return {"pixel_values": self.normalize(self.uint8_batch(items))}

    def uint8_batch(self, items: Sequence) -> np.ndarray:
        """(n, size, size, 3) uint8 of images or paths: ``resize_crop`` of each."""
        from .images import load_image

        return np.stack([self.resize_crop(load_image(item)) for item in items])

    def save(self, folder: Path) -> None:
        (Path(folder) / self.file_name).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "ImagePreprocessor":
        data = json.loads((Path(folder) / cls.file_name).read_text())
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(ImagePreprocessConfig(**data))


@dataclass
class TextPreprocessConfig:
    max_length: int = 77  # tokens, special tokens included; longer texts are truncated
    extra: dict = field(default_factory=dict)  # reserved for tokenizer-specific settings
    padding: str = "longest"  # longest: pad a batch to its longest text; max_length: every text to max_length (SigLIP)
    pad_token: str | None = None  # the padding token; None: [PAD] or <pad>, whichever the vocabulary has

    def __post_init__(self) -> None:
        if self.padding not in PADDING_MODES:
            raise ConfigError(f"text padding must be one of {PADDING_MODES}, not {self.padding!r}")


class TextPreprocessor:
    """A Hugging Face fast tokenizer (tokenizer.json) with truncation and pad-to-longest."""

    file_name = "text_preprocess.json"
    tokenizer_file = "tokenizer.json"

    def __init__(self, tokenizer, config: TextPreprocessConfig):
        self.config = config
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.tokenizer.enable_truncation(max_length=config.max_length)
        pad_token = config.pad_token or next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None),
                                             "[PAD]")
        pad_id = tokenizer.token_to_id(pad_token)
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token=pad_token,
                                      length=config.max_length if config.padding == "max_length" else None)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.tokenizer.save(str(folder / self.tokenizer_file))
        (folder / self.file_name).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "TextPreprocessor":
        from tokenizers import Tokenizer

        folder = Path(folder)
        data = json.loads((folder / cls.file_name).read_text())
        return cls(Tokenizer.from_file(str(folder / cls.tokenizer_file)), TextPreprocessConfig(**data))


def load_preprocessor(folder: Path) -> ImagePreprocessor | TextPreprocessor:
    """Whichever preprocessor was saved in a tower folder."""
    folder = Path(folder)
    if (folder / TextPreprocessor.file_name).exists():
        return TextPreprocessor.load(folder)
    return ImagePreprocessor.load(folder)
