"""What every on-disk format of mmretrieve shares: a hash of file contents and the check that
refuses folders written by a newer mmretrieve."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import __version__


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def damaged_file(folder: Path, files: dict[str, str]) -> str | None:
    """The first of ``files`` ({name relative to ``folder``: SHA-256}) that is missing or whose
    contents changed, or None when every one matches."""
    for name, expected in files.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != expected:
            return name
    return None


def check_format(manifest: dict[str, Any], folder: Path, expected: str, supported_version: int, noun: str,
                 error: type[Exception]) -> None:
    """Raise ``error`` unless ``manifest`` is of format ``expected`` at a version this code reads."""
    if manifest.get("format") != expected:
        raise error(f"{folder} is not an mmretrieve {noun} (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > supported_version:
        raise error(
            f"{folder} uses {noun} format {manifest['format_version']}, newer than this mmretrieve "
            f"({__version__}) reads ({supported_version}); upgrade with `pip install -U mmretrieve`"
        )
