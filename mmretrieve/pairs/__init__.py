"""Pretrained text/image pairs (CLIP, SigLIP, open_clip, ...) as ordinary model bundles.

A pair plugin turns a checkpoint into :class:`PairParts`: two *registered* encoders that
compute the checkpoint's pooled, pre-projection features, the checkpoint's projections and its
temperature. :func:`model_from_pair` makes the RetrievalModel those parts describe (the
projections become its linear heads, so nothing needs training), and :func:`pair_bundle` saves it
once, by reference to the two encoders, as a bundle in the user's cache, rebuilt when the
checkpoint changes. From there a pair is a model like any other: index, search, eval, export,
serve and ``train --init`` read the bundle.

A model plugin registers a prefix (``ModelSpec(name="clip", prefixes=("clip:",), ...)``) whose
factory answers ``clip:CHECKPOINT`` with ``pair_bundle(ref, build, identity)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..config import ModelConfig, TowerConfig

if TYPE_CHECKING:
    import torch

    from ..encoders.base import Encoder
    from ..model import RetrievalModel

# Bumped when the way a pair becomes a bundle changes, so cached pair bundles are rebuilt.
PAIR_FORMAT = 1
ENV_CACHE = "MMRETRIEVE_CACHE"  # where pair bundles (and other derived files) are cached


@dataclass
class PairParts:
    """Everything a pretrained pair contributes to a RetrievalModel."""

    text: "Encoder"  # a registered encoder; forward -> pooled, pre-projection text features
    image: "Encoder"  # a registered encoder; forward -> pooled, pre-projection image features
    text_tower: TowerConfig  # encoder name + options that rebuild exactly this text tower (bundle reference)
    image_tower: TowerConfig  # the same for the image tower
    text_projection: "torch.Tensor | None"  # (embed_dim, text.dim) weight of a bias-free linear; None = identity
    image_projection: "torch.Tensor | None"  # (embed_dim, image.dim); None = identity
    logit_scale: float  # the checkpoint's log(1/T)
    logit_bias: float | None = None  # SigLIP's; recorded for `train --init` with the siglip loss
    source: dict[str, Any] = field(default_factory=dict)  # JSON-able: kind, checkpoint, revision, digest (for `info`)


def _projection_dim(projection, dim: int, tower: str) -> int:
    if projection is None:
        return dim
    if projection.ndim != 2 or projection.shape[1] != dim:
        raise ValueError(f"the {tower} projection has shape {tuple(projection.shape)}; expected (embed_dim, {dim})")
    return int(projection.shape[0])


def model_from_pair(parts: PairParts) -> "RetrievalModel":
    """The RetrievalModel of a pair: linear heads holding the checkpoint's projections (identity
    where it has none), its temperature, and a temperature clamp no lower than the checkpoint's."""
    import torch

    from ..model import RetrievalModel

    text_dim = _projection_dim(parts.text_projection, parts.text.dim, "text")
    image_dim = _projection_dim(parts.image_projection, parts.image.dim, "image")
    if text_dim != image_dim:
        raise ValueError(f"the pair's text and image embeddings differ in size ({text_dim} and {image_dim})")
    scale = float(parts.logit_scale)
    config = ModelConfig(text=parts.text_tower, image=parts.image_tower, embed_dim=text_dim, head="linear",
                         init_temperature=math.exp(-scale),
                         max_logit_scale=max(ModelConfig.max_logit_scale, math.exp(scale)))
    model = RetrievalModel(config, parts.text, parts.image)
    with torch.no_grad():
        for head, projection in ((model.text_head, parts.text_projection), (model.image_head, parts.image_projection)):
            weight = torch.eye(text_dim) if projection is None else projection.detach().float().cpu()
            head.weight.copy_(weight.to(head.weight.dtype))
        model.logit_scale.fill_(scale)
    return model


def cache_root() -> Path:
    """$MMRETRIEVE_CACHE, else $XDG_CACHE_HOME/mmretrieve, else ~/.cache/mmretrieve."""
    from ..plugins import cache_dir

    return Path(os.environ[ENV_CACHE]).expanduser() if os.environ.get(ENV_CACHE) else cache_dir()


def bundle_folder(ref: str) -> Path:
    """Where the cached bundle of model reference ``ref`` lives: a readable slug plus a short hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ref).strip("._-")[-80:] or "pair"
    return cache_root() / "models" / f"{slug}-{hashlib.sha256(ref.encode()).hexdigest()[:12]}"


def _stamp(ref: str, identity: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__
    from ..bundle import FORMAT_VERSION

    # mmretrieve's version too: a release may derive the preprocessing or the towers differently.
    return {"ref": ref, "identity": identity, "pair_format": PAIR_FORMAT, "bundle_format": FORMAT_VERSION,
            "mmretrieve_version": __version__}


def _is_current(folder: Path, stamp: dict[str, Any]) -> bool:
    from ..atomic import recover_directory
    from ..bundle import MANIFEST, MODEL_JSON, WEIGHTS
    from ..formats import peek_json_object

    recover_directory(folder)
    manifest = peek_json_object(folder / MANIFEST)
    if manifest is None or not (folder / WEIGHTS).is_file() or not (folder / MODEL_JSON).is_file():
        return False
    return json.dumps(manifest.get("metadata", {}).get("pair"), sort_keys=True) == json.dumps(stamp, sort_keys=True)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder at a time per cached bundle, across processes (others wait, then reuse it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: atomic_directory alone; the last of identical writers wins
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pair_bundle(ref: str, build: Callable[[], PairParts], identity: dict[str, Any]) -> Path:
    """The cached bundle folder for model reference ``ref`` (``clip:openai/clip-vit-base-patch32``).

    ``identity`` (JSON-able) says which checkpoint ``ref`` means now: a hub commit hash, or a local
    folder's file sizes and modification times. The bundle is reused while its identity (and the
    bundle and pair formats) match, else ``build()`` is called and the bundle written again, with
    both towers stored by reference to their registered encoders (only the heads and temperature are
    in its weights file) and ``source`` and ``logit_bias`` in its manifest's metadata. Concurrent
    first uses wait for one builder; the folder is replaced atomically.
    """
    from ..bundle import save_bundle

    folder = bundle_folder(ref)
    stamp = _stamp(ref, identity)
    if _is_current(folder, stamp):
        return folder
    with _build_lock(folder):
        if _is_current(folder, stamp):  # another process built it while this one waited
            return folder
        parts = build()
        model = model_from_pair(parts).eval()
        metadata = {"pair": stamp, "source": parts.source, "logit_bias": parts.logit_bias}
        save_bundle(model, folder, metadata=metadata, reference_towers=("text", "image"))
    return folder
