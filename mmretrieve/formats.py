"""What every on-disk format of mmretrieve shares: a hash of file contents, the check that
refuses folders written by a newer mmretrieve, and the one reader of a self-describing folder's
manifest (model bundles, ONNX exports, fusion bundles, index folders, vector index folders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import InputError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib  # here: OpenSSL's start-up is a cost every command paid, a search hashes nothing

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def peek_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object: for a
    caller that only looks (what kind of folder, what to suggest), where ``read_json_object`` refuses."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_json_object(path: Path, damaged: Callable[[str], Exception]) -> dict[str, Any]:
    """The JSON object in ``path``; anything else (unreadable, not JSON, a list) is
    ``damaged(problem)`` with a problem naming the file, e.g. "model.json holds no JSON object"."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged(f"{Path(path).name} is missing") from None
    except PermissionError:  # not damage: rebuilding would not help
        raise InputError(f"{path} cannot be read (permission denied); run as a user who may read it") from None
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise damaged(f"{Path(path).name} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise damaged(f"{Path(path).name} holds no JSON object")
    return data


def read_folder_manifest(folder: str | Path, file_name: str, format_name: str, supported_version: int, what: str,
                         error_type: type[Exception], *, missing: str | None = None,
                         damaged: Callable[[str], Exception] | None = None, verify: bool = False,
                         recover: bool = False) -> dict[str, Any]:
    """The manifest ``file_name`` of a self-describing ``folder``, checked; every reader of one
    (bundle, export, fusion bundle, index, vector index) calls this, then checks its own fields.

    - ``recover``: the folder is an ``atomic_directory`` target, so a save killed between its
      renames is put back first (``mmretrieve.atomic.recover_directory``).
    - No manifest: ``error_type(missing)`` when ``missing`` is given (the folder is not a
      ``what``: a user's mistake), else the folder is damaged.
    - Damage (the manifest unreadable, not a JSON object, or with ``verify`` a file listed in its
      ``files`` ({name: SHA-256}) missing or changed) is ``damaged(problem)``, the problem naming
      the file (default: ``error_type("FOLDER: PROBLEM")``).
    - A manifest of another format, or of a newer version than ``supported_version``, is
      ``error_type`` (see :func:`check_format`; ``what`` names the kind of folder there).
    """
    folder = Path(folder)
    if recover:
        from .atomic import recover_directory

        recover_directory(folder)
    if damaged is None:
        def damaged(problem: str) -> Exception:
            return error_type(f"{folder}: {problem}")
    path = folder / file_name
    if missing is not None and not path.is_file():
        raise error_type(missing)
    manifest = read_json_object(path, damaged)
    check_format(manifest, folder, format_name, supported_version, what, error_type)
    if verify:
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise damaged(f"{file_name} lists no SHA-256 of its files")
        for name, expected in files.items():
            if not (folder / name).is_file():
                raise damaged(f"{name} is missing")
            if sha256_file(folder / name) != expected:
                raise damaged(f"{name} does not match its recorded hash")
    return manifest
