"""Fusion bundles: a trained fusion head as a small self-describing folder.

    fusion.json           strategy name, dimension, the base model's fingerprint, the head's
                          digest, training summary
    weights.safetensors   the head's tensors for PyTorch (never a pickle)
    fusion.onnx           the same head for onnxruntime, parity-checked before it is kept
    manifest.json         format, version, file hashes

A head only means something on top of the embeddings it was trained on, so loading it for a
model with another fingerprint is refused. Heads trained for a model bundle live inside it, in
``BUNDLE/fusion/<strategy>/``, and `mmretrieve export` carries them into the export. Written
atomically: a crash leaves the old folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BundleError
from ..formats import read_folder_manifest, read_json_object, sha256_file
from .strategies import LearnedFusion

FORMAT = "mmretrieve-fusion"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FUSION_JSON = "fusion.json"
WEIGHTS = "weights.safetensors"
ONNX_GRAPH = "fusion.onnx"
FUSION_FOLDER = "fusion"  # inside a model bundle or export: one fusion bundle per strategy


def head_digest(state: dict) -> str:
    """SHA-256 over the head's tensors (names, dtypes, shapes, values): the same head gives the same
    digest however often it is saved, so an index can tell which head built it."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def attached_heads(model_folder: str | Path) -> dict[str, Path]:
    """The fusion bundles stored in a model bundle or export folder: {strategy: folder}."""
    from ..atomic import recover_directory

    root = Path(model_folder) / FUSION_FOLDER
    if not root.is_dir():
        return {}
    for folder in root.iterdir():  # a head whose save was killed between renames is put back
        if folder.name.startswith(".") and ".new-" in folder.name:
            recover_directory(root / folder.name[1:].partition(".new-")[0])
    # Hidden folders are atomic_directory's staging and retired copies, never heads.
    return {folder.name: folder for folder in sorted(root.iterdir())
            if not folder.name.startswith(".") and (folder / MANIFEST).is_file()}


def save_fusion(strategy: LearnedFusion, folder: str | Path, base_fingerprint: str,
                training: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_directory
    from .onnx import export_fusion_onnx

    folder = Path(folder)
    with atomic_directory(folder) as staging:
        state = {k: v.detach().contiguous().cpu() for k, v in strategy.head.state_dict().items()}
        save_file(state, str(staging / WEIGHTS), metadata={"format": FORMAT})
        parity = export_fusion_onnx(strategy, staging / ONNX_GRAPH)  # raises (nothing kept) below the bar
        description = {"strategy": strategy.name, "dim": strategy.dim, "base_model_fingerprint": base_fingerprint,
                       "head_digest": head_digest(state), "onnx_parity": parity, "training": training or {}}
        (staging / FUSION_JSON).write_text(json.dumps(description, indent=2))
        files = {name: sha256_file(staging / name) for name in (WEIGHTS, ONNX_GRAPH, FUSION_JSON)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "mmretrieve_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def read_fusion_info(folder: str | Path) -> dict[str, Any]:
    """fusion.json of a verified fusion bundle."""
    folder = Path(folder)

    def damaged(problem: str) -> BundleError:
        return BundleError(f"{folder}: {problem}; train the head again with `mmretrieve train-fusion`")

    read_folder_manifest(folder, MANIFEST, FORMAT, FORMAT_VERSION, "fusion bundle", BundleError, recover=True,
                         verify=True, damaged=damaged,
                         missing=f"{folder} is not a fusion bundle (no {MANIFEST}); train one first")
    return read_json_object(folder / FUSION_JSON, damaged)


def check_base_model(folder: Path, description: dict[str, Any], base_fingerprint: str | None) -> None:
    trained_on = description["base_model_fingerprint"]
    if base_fingerprint is not None and base_fingerprint != trained_on:
        raise BundleError(f"{folder} was trained on the embeddings of model {trained_on[:12]}, not of this model "
                          f"({base_fingerprint[:12]}); train a fusion head for this model with `mmretrieve train-fusion`")


def load_fusion(folder: str | Path, base_fingerprint: str | None = None) -> LearnedFusion:
    """The trained strategy (PyTorch); with ``base_fingerprint``, refuse a head trained on another model."""
    from safetensors.torch import load_file

    from . import create_fusion

    folder = Path(folder)
    description = read_fusion_info(folder)
    check_base_model(folder, description, base_fingerprint)
    trained_on = description["base_model_fingerprint"]
    strategy = create_fusion(description["strategy"], dim=int(description["dim"]))
    try:
        strategy.head.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as exc:
        raise BundleError(f"{folder}: weights do not fit the {description['strategy']} head ({exc})") from None
    strategy.head.eval()
    strategy.base_fingerprint = trained_on
    strategy.digest = description.get("head_digest") or head_digest(strategy.head.state_dict())
    return strategy
