"""A corpus of awkward and hostile image files, with what every entry point should make of each.

Shared by tests/test_bad_inputs.py (fast assertions on a tiny model) and
benchmarks/bad_input_corpus.py (the same corpus through the CLI, printed as a table).
Needs only NumPy and Pillow, so either side can import it without mmretrieve.

Each ``Case`` says whether the file is usable (it must be indexed, searchable, kept by data
loading and answered 200 by the upload endpoint, and ``check`` must pass on the decoded image),
or else which words its recorded reason contains and which HTTP status an upload of its bytes
gets. ``scan`` marks files whose fate the folder scan decides (links, loops, odd names).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

RED = (220, 20, 30)


@dataclass
class Case:
    kind: str  # the row's label
    name: str  # path below the corpus folder
    usable: bool  # decodes into an image the model embeds
    reason: str = ""  # unusable: words (lower case) of the reason a reader gives (load_image, decode, data)
    upload: int | None = 200  # status of an upload of the file's bytes; None: nothing to upload
    listed: str | None = None  # words of the reason `index` lists it with, when not the reader's
    absent: bool = False  # `index` neither indexes nor lists it (a folder is walked, not read)
    scan: bool = False  # the folder scan decides its fate (links, loops, odd names)
    check: Callable[[Image.Image], str | None] | None = None  # usable: None if the decoded image is right

    def path(self, root: Path) -> Path:
        return Path(root) / self.name

    @property
    def index_words(self) -> str:
        return self.reason if self.listed is None else self.listed


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for 2-D input, RGB for HxWx3), which Pillow cannot write."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    return _png(width, height, 16, colour_type, zlib.compress(raw))


def _png(width: int, height: int, depth: int, colour_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(side: int = 10_000) -> bytes:
    """A ~100 KB grey PNG of side x side black pixels (100 MP once decoded)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return _png(side, side, 8, 0, idat)


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    """A smooth random picture (what a photo looks like to a resampling filter)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _grey16() -> np.ndarray:
    return (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)


def _close(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def _check_grey16(image: Image.Image) -> str | None:
    got = np.asarray(image)[..., 0].astype(int)
    want = (_grey16() >> 8).astype(int)
    return None if np.abs(got - want).max() <= 1 else f"16-bit grey off by {np.abs(got - want).max()} levels"


def _check_rgb16(image: Image.Image) -> str | None:
    want = (_rgb16() >> 8).astype(int)
    return None if np.array_equal(np.asarray(image).astype(int), want) else "16-bit RGB differs from its 8-bit version"


def _rgb16() -> np.ndarray:
    return (np.random.default_rng(7).random((40, 56, 3)) * 65535).astype(np.uint16)


def _float_values() -> np.ndarray:
    return np.linspace(0.0, 1.0, 48 * 64, dtype=np.float32).reshape(48, 64)


def _check_float(image: Image.Image) -> str | None:
    want = np.rint(_float_values() * 255).astype(int)
    got = np.asarray(image)[..., 0].astype(int)
    return None if np.abs(got - want).max() <= 1 else "float TIFF not scaled from 0..1 to 0..255"


def _check_pixel(xy, expected, what) -> Callable[[Image.Image], str | None]:
    def check(image: Image.Image) -> str | None:
        pixel = image.getpixel(xy)
        return None if _close(pixel, expected) else f"{what}: pixel {xy} is {pixel}, expected about {expected}"

    return check


def _check_size(size) -> Callable[[Image.Image], str | None]:
    return lambda image: None if image.size == size else f"decoded as {image.size}, expected {size} (upright)"


def make_corpus(root: Path) -> list[Case]:
    """Write every case below ``root`` (created) and return them, in table order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(case: Case, data: bytes | None = None) -> None:
        if data is not None:
            case.path(root).parent.mkdir(parents=True, exist_ok=True)
            case.path(root).write_bytes(data)
        cases.append(case)

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        out = io.BytesIO()
        image.save(out, fmt, **options)
        return out.getvalue()

    # -- usable: each must be indexed, searchable, loaded, uploaded, and look right ----------------
    add(Case("ordinary JPEG", "ordinary.jpg", True), encoded(_photo(1), "JPEG", quality=92))
    add(Case("CMYK JPEG", "cmyk.jpg", True, check=_check_pixel((5, 5), RED, "CMYK colours")),
        encoded(Image.new("RGB", (64, 48), RED).convert("CMYK"), "JPEG", quality=95))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    add(Case("EXIF rotation", "exif_rotated.jpg", True, check=_check_size((48, 96))),
        encoded(_photo(2, (96, 48)), "JPEG", exif=exif))
    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add(Case("animated GIF", "animated.gif", True, check=_check_pixel((5, 5), RED, "first frame")), gif.getvalue())
    add(Case("16-bit grey PNG", "grey16.png", True, check=_check_grey16), png16(_grey16()))
    add(Case("16-bit RGB PNG", "rgb16.png", True, check=_check_rgb16), png16(_rgb16()))
    add(Case("float TIFF (mode F)", "float.tif", True, check=_check_float),
        encoded(Image.fromarray(_float_values()), "TIFF"))
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[:, 32:] = (*RED, 255)  # left half fully transparent (and black underneath)
    add(Case("RGBA, transparent half", "rgba.png", True, check=_check_pixel((5, 5), (255, 255, 255), "on white")),
        encoded(Image.fromarray(rgba), "PNG"))
    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(1, (32, 0, 64, 48))
    add(Case("palette + transparency", "palette.png", True,
             check=_check_pixel((5, 5), (255, 255, 255), "transparent colour on white")),
        encoded(palette, "PNG", transparency=0))
    add(Case("grey + alpha (LA)", "grey_alpha.png", True, check=_check_pixel((5, 5), (255, 255, 255), "on white")),
        encoded(Image.merge("LA", (Image.new("L", (64, 48), 0), Image.new("L", (64, 48), 0))), "PNG"))
    add(Case("panorama 12:1", "panorama.jpg", True, check=_check_size((1200, 100))),
        encoded(_photo(3, (1200, 100)), "JPEG"))
    add(Case("unicode name", "café ☕ 日本.png", True), encoded(_photo(4), "PNG"))
    add(Case("newline in name", "new\nline.png", True, scan=True), encoded(_photo(5), "PNG"))

    # -- unusable: each must be recorded with its reason, never crash or hang ----------------------
    add(Case("zero bytes", "zero.jpg", False, "not an image file", upload=400), b"")
    whole = encoded(_photo(6, (200, 150)), "JPEG", quality=95)
    add(Case("truncated JPEG", "truncated.jpg", False, "unreadable image", upload=400), whole[: len(whole) // 2])
    add(Case("not an image", "notes.jpg", False, "not an image file", upload=415), b"shopping list: milk, eggs\n" * 20)
    add(Case("decompression bomb", "bomb.png", False, "decompression bomb", upload=413), bomb_png())
    add(Case("strip 1x16000", "strip_16k.png", False, "aspect ratio", upload=422),
        encoded(Image.new("RGB", (1, 16000), RED), "PNG", optimize=True))
    add(Case("strip 40000x1", "strip_40k.png", False, "aspect ratio", upload=422),
        encoded(Image.new("RGB", (40000, 1), RED), "PNG", optimize=True))
    with open(root / "huge.jpg", "wb") as handle:  # sparse: no disk space, no time
        handle.truncate((256 << 20) + 1)
    add(Case("file over 256 MB", "huge.jpg", False, "256 mb limit", upload=None))
    os.symlink("/dev/zero", root / "dev_zero.jpg")
    add(Case("link to /dev/zero", "dev_zero.jpg", False, "device", upload=None, listed="outside the folder", scan=True))
    os.mkfifo(root / "fifo.jpg")
    add(Case("FIFO", "fifo.jpg", False, "fifo", upload=None))
    (root / "folder.jpg").mkdir()
    add(Case("folder named .jpg", "folder.jpg", False, "is a folder", upload=None, absent=True, scan=True))
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    add(Case("dangling link", "dangling.jpg", False, "no such file", upload=None, listed="dangling", scan=True))
    os.symlink("loop.jpg", root / "loop.jpg")
    add(Case("link loop (file)", "loop.jpg", False, "symbolic links", upload=None, listed="loop", scan=True))
    (root / "deep").mkdir()
    os.symlink("..", root / "deep" / "up")  # deep/up/deep/up/... forever, if followed
    add(Case("link loop (folder)", "deep/up", False, "is a folder", upload=None, listed="loop", scan=True))
    return cases


def expected_index(case: Case) -> str:
    """What `index` should make of a case: indexed, listed (with words of its reason), or absent."""
    if case.usable:
        return "indexed"
    return "absent" if case.absent else f"listed: {case.index_words}"
