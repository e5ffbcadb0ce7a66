"""Training a fusion head with the contrastive core, on cached embeddings.

Each step takes a batch of distinct images; for each, one caption joins the image to form the
fused item and a *different* caption of the same image is its query. The item and query
embeddings meet in CLIP's InfoNCE with a learnable temperature, so the head learns what makes
an image-plus-caption item findable by another description of the same photo.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .embeddings import CaptionedEmbeddings
from .strategies import LearnedFusion


@dataclass
class FusionTrainConfig:
    epochs: int = 10  # passes over the images
    batch_size: int = 256  # distinct images per step; the other items are the negatives
    lr: float = 1e-3  # AdamW learning rate for the head and the temperature
    weight_decay: float = 0.0  # pulls a head away from its mean-fusion start, so off by default
    init_temperature: float = 0.07  # CLIP's starting temperature
    max_logit_scale: float = 100.0  # CLIP's clamp on 1/T
    seed: int = 0  # batch order and caption choice


def caption_table(owners: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Flat caption indices of each image."""
    table: list[list[int]] = [[] for _ in range(n_images)]
    for caption, image in enumerate(owners.tolist()):
        table[image].append(caption)
    return [np.asarray(rows, dtype=np.int64) for rows in table]


def sample_pairs(captions: list[np.ndarray], images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each image: an item caption and a different query caption, both uniformly drawn."""
    item, query = [], []
    for image in images.tolist():
        own = captions[image]
        first, second = rng.choice(len(own), size=2, replace=False)
        item.append(own[first])
        query.append(own[second])
    return np.asarray(item), np.asarray(query)


def train_fusion(strategy: LearnedFusion, embeddings: CaptionedEmbeddings,
                 config: FusionTrainConfig | None = None) -> dict[str, float]:
    """Train ``strategy.head`` in place; returns a summary (steps, last loss, temperature)."""
    import torch

    from ..train.losses import InfoNCELoss

    config = config or FusionTrainConfig()
    captions = caption_table(embeddings.owners, len(embeddings.images))
    usable = np.asarray([i for i, own in enumerate(captions) if len(own) >= 2])
    if len(usable) < 2:
        raise InputError("fusion training needs at least two images with two or more captions each "
                         "(one joins the item, another is its query)")
    batch_size = min(config.batch_size, len(usable))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    texts = torch.from_numpy(embeddings.texts)
    images = torch.from_numpy(embeddings.images)
    head = strategy.head.train()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
    optimizer = torch.optim.AdamW([*head.parameters(), logit_scale], lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = InfoNCELoss()
    steps, loss = 0, float("nan")
    for _ in range(config.epochs):
        order = rng.permutation(usable)
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches: equal negatives
            batch = order[start:start + batch_size]
            item, query = sample_pairs(captions, batch, rng)
            fused = head(texts[item], images[batch])
            value = loss_fn(fused, texts[query], logit_scale.exp().clamp(max=config.max_logit_scale))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            steps, loss = steps + 1, float(value.detach())
    head.eval()
    temperature = 1.0 / float(logit_scale.detach().exp().clamp(max=config.max_logit_scale))
    return {"steps": steps, "final_loss": loss, "temperature": temperature, "images": int(len(usable))}


def default_heads_folder(model_ref: str) -> Path | None:
    """Where heads for ``model_ref`` go when no --out is given: inside a bundle folder the user named
    (``BUNDLE/fusion``), never inside an installed package's registered model."""
    from .store import FUSION_FOLDER

    folder = Path(model_ref).expanduser()
    return folder / FUSION_FOLDER if (folder / "manifest.json").is_file() else None


def train_fusion_heads(model_ref: str, data: str | Path, strategies: list[str] | None = None,
                       out: str | Path | None = None, config: FusionTrainConfig | None = None,
                       cache_dir: str | Path | None = None, workers: int = 0,
                       device: str | None = None) -> list[dict[str, Any]]:
    """Train each trainable strategy (default: all registered) on a captioned set and save it as a
    fusion bundle under ``out/<strategy>`` (default: inside the model bundle). Returns one report
    per head."""
    from ..bundle import load_bundle
    from ..data import load_captions
    from . import create_fusion, list_fusion_strategies
    from .embeddings import embed_captioned
    from .resolve import fusion_spec
    from .store import read_fusion_info, save_fusion

    out = Path(out) if out is not None else default_heads_folder(str(model_ref))
    if out is None:
        raise InputError(f"{model_ref} is not a model bundle folder to store the heads in; give --out DIR")
    names = strategies or [n for n in list_fusion_strategies() if fusion_spec(n).trainable]
    for name in names:
        if not fusion_spec(name).trainable:
            raise InputError(f"{name} has nothing to train; train-fusion trains "
                             f"{', '.join(n for n in list_fusion_strategies() if fusion_spec(n).trainable)}")
    config = config or FusionTrainConfig()
    model = load_bundle(model_ref)
    captioned = load_captions(data, check_images=False)
    embeddings = embed_captioned(model, captioned.items, cache_dir, Path(data).resolve().parent.name,
                                 workers=workers, device=device)
    reports = []
    for name in names:
        canonical = fusion_spec(name).name
        strategy = create_fusion(canonical, dim=model.embed_dim)
        started = time.perf_counter()
        summary = train_fusion(strategy, embeddings, config)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        folder = save_fusion(strategy, out / canonical, model.bundle.fingerprint,
                             training={**summary, "data": str(Path(data).resolve()), "config": asdict(config)})
        parity = read_fusion_info(folder)["onnx_parity"]["min_cosine"]
        reports.append({"strategy": canonical, "folder": str(folder), **summary, "onnx_min_cosine": parity})
    return reports
