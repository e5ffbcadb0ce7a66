"""``--model open-clip:...``: an open_clip checkpoint as a ready-to-search mmretrieve model.

The checkpoint is loaded once and taken apart (``towers``): both towers become registered
encoders (``open-clip-text``, ``open-clip-image``), the projections the model's linear heads and
the checkpoint's ``logit_scale`` (and SigLIP's ``logit_bias``) its temperature. The bundle that
``mmretrieve.pairs.pair_bundle`` caches stores the towers by reference to the checkpoint.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .naming import HF_HUB, LOCAL_DIR, join_model_name, split_model_name

REF_PREFIX = "open-clip:"


def _open_clip_version() -> str:
    try:
        return version("open_clip_torch")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        return "unknown"


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def identity(model_name: str, weights: str | None) -> dict[str, Any]:
    """Which checkpoint the name means now, cheaply and without torch: a local file's (or folder's
    files') sizes and modification times; a tag or Hub repository by name and open_clip version."""
    found: dict[str, Any] = {"model": model_name, "weights": weights, "open_clip": _open_clip_version()}
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR):])
        if folder.is_dir():
            found["files"] = {p.name: _file_identity(p) for p in sorted(folder.iterdir()) if p.is_file()}
    elif weights and os.path.isfile(weights):
        found["file"] = _file_identity(Path(weights))
    return found


def pair_parts(model_name: str, weights: str | None = None):
    """The PairParts of an open_clip checkpoint (see ``naming`` for the names)."""
    from mmretrieve.config import TowerConfig
    from mmretrieve.pairs import PairParts

    from .towers import OpenClipImageEncoder, OpenClipTextEncoder, load_model

    model, config = load_model(model_name, weights)
    options = {"model_name": model_name, "weights": weights}
    logit_scale = float(model.logit_scale.detach().reshape(-1)[0])
    bias = getattr(model, "logit_bias", None)
    logit_bias = None if bias is None else float(bias.detach().reshape(-1)[0])
    text = OpenClipTextEncoder.from_open_clip(model, config, options)
    image = OpenClipImageEncoder.from_open_clip(model, config, options)
    for encoder in (text, image):
        encoder.registered_name = encoder.family
    source = {"kind": "open_clip", "checkpoint": join_model_name(model_name, weights), "model": model_name,
              "weights": weights, "open_clip": _open_clip_version(),
              "text_projection": "linear" if text.projection is not None else "inside the tower",
              "image_projection": "linear" if image.projection is not None else "inside the tower"}
    return PairParts(text=text, image=image,
                     text_tower=TowerConfig("open-clip-text", dict(options)),
                     image_tower=TowerConfig("open-clip-image", dict(options)),
                     text_projection=text.projection, image_projection=image.projection,
                     logit_scale=logit_scale, logit_bias=logit_bias, source=source)


def open_clip_model(rest: str) -> Path:
    """``--model open-clip:REST``: the cached bundle of the checkpoint REST names."""
    from mmretrieve.errors import InputError
    from mmretrieve.pairs import pair_bundle

    from .naming import SYNTAX

    model_name, weights = split_model_name(rest)
    if not model_name or (not weights and not model_name.startswith((HF_HUB, LOCAL_DIR))):
        raise InputError(f"open-clip:{rest} names no weights; write {SYNTAX} (`mmretrieve open-clip-models` "
                         f"lists the tags)")
    ref = REF_PREFIX + join_model_name(model_name, weights)
    return pair_bundle(ref, lambda: pair_parts(model_name, weights), identity(model_name, weights))
