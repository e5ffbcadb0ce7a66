"""Fusion bundles: a trained fusion head as a small self-describing folder.

    fusion.json           strategy name, dimension, the base model's fingerprint, training summary
    weights.safetensors   the head's tensors (never a pickle)
    manifest.json         format, version, file hashes

A head only means something on top of the embeddings it was trained on, so loading it for a
model with another fingerprint is refused. Written atomically: a crash leaves the old folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BundleError
from ..formats import check_format, sha256_file
from .strategies import LearnedFusion

FORMAT = "mmretrieve-fusion"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FUSION_JSON = "fusion.json"
WEIGHTS = "weights.safetensors"


def save_fusion(strategy: LearnedFusion, folder: str | Path, base_fingerprint: str,
                training: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_directory

    folder = Path(folder)
    with atomic_directory(folder) as staging:
        state = {k: v.detach().contiguous().cpu() for k, v in strategy.head.state_dict().items()}
        save_file(state, str(staging / WEIGHTS), metadata={"format": FORMAT})
        description = {"strategy": strategy.name, "dim": strategy.dim, "base_model_fingerprint": base_fingerprint,
                       "training": training or {}}
        (staging / FUSION_JSON).write_text(json.dumps(description, indent=2))
        files = {name: sha256_file(staging / name) for name in (WEIGHTS, FUSION_JSON)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmretrieve_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def read_fusion_info(folder: str | Path) -> dict[str, Any]:
    """fusion.json of a verified fusion bundle."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BundleError(f"{folder} is not a fusion bundle (no {MANIFEST}); train one first")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        description = json.loads((folder / FUSION_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{folder}: unreadable fusion bundle metadata ({exc})") from None
    check_format(manifest, folder, FORMAT, FORMAT_VERSION, "fusion bundle", BundleError)
    for name, expected in manifest["files"].items():
        if not (folder / name).is_file() or sha256_file(folder / name) != expected:
            raise BundleError(f"{folder}: {name} is missing or does not match its recorded hash")
    return description


def load_fusion(folder: str | Path, base_fingerprint: str | None = None) -> LearnedFusion:
    """The trained strategy; with ``base_fingerprint``, refuse a head trained on another model."""
    from safetensors.torch import load_file

    from . import create_fusion

    folder = Path(folder)
    description = read_fusion_info(folder)
    trained_on = description["base_model_fingerprint"]
    if base_fingerprint is not None and base_fingerprint != trained_on:
        raise BundleError(f"{folder} was trained on the embeddings of model {trained_on}, not of this model "
                          f"({base_fingerprint}); train a fusion head for this model")
    strategy = create_fusion(description["strategy"], dim=int(description["dim"]))
    try:
        strategy.head.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as exc:
        raise BundleError(f"{folder}: weights do not fit the {description['strategy']} head ({exc})") from None
    strategy.head.eval()
    strategy.base_fingerprint = trained_on
    return strategy
