"""Feeding the loop: deterministic batches, one caption per image per step (sampler, dataset, collate).

Batches are a pure function of (seed, epoch, position), so a resumed run sees exactly the
batches an uninterrupted one would have, and ranks under torchrun take disjoint shards.
Each batch holds distinct images, so no caption of the same photo appears as a false negative.
Frozen towers' features are computed and cached by ``mmretrieve.embedding.cached_tower_features``,
keyed by ``mmretrieve.bundle.tower_fingerprint``; with several cached views per image
(``image_views``, ``mmretrieve.embedding.cached_view_features``) the plan also picks each image's view
for the epoch, from a stream of its own, so the images and captions are those of a one-view run.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data import CaptionedImage
from ..encoders.base import Encoder
from ..errors import InputError
from ..images import load_image


class EpochBatches(Sampler):
    """Yields lists of (image index, caption index), or with ``views`` > 1 of (image index, caption
    index, view), resumable from (epoch, batch)."""

    def __init__(self, caption_counts: Sequence[int], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, views: int = 1):
        self.caption_counts = np.asarray(caption_counts)
        self.views = views
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = len(self.caption_counts) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise InputError(
                f"{len(self.caption_counts)} training images cannot fill one batch of {batch_size}"
                + (f" on each of {world_size} processes" if world_size > 1 else "")
                + "; lower batch_size"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.caption_counts))
        captions = (rng.random(len(order)) * self.caption_counts[order]).astype(np.int64)
        return order, captions

    def epoch_views(self, epoch: int) -> np.ndarray:
        """The view of each image (by image index) in ``epoch``: uniform over the cached views."""
        return np.random.default_rng([self.seed, epoch, 1]).integers(0, self.views, len(self.caption_counts))

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        order, captions = self.epoch_plan(self.epoch)
        columns = [order, captions] + ([self.epoch_views(self.epoch)[order]] if self.views > 1 else [])
        per_step = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            lo = batch * per_step + self.rank * self.batch_size
            yield list(zip(*(column[lo:lo + self.batch_size].tolist() for column in columns)))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class PairDataset(Dataset):
    """Decodes and preprocesses an image (unless its tower is cached) and picks its caption."""

    def __init__(self, items: list[CaptionedImage], image_encoder: Encoder | None, caption_offsets: np.ndarray):
        self.items = items
        self.image_preprocessor = image_encoder.preprocessor if image_encoder is not None else None
        self.caption_offsets = caption_offsets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        image_index, caption_index = key[:2]
        item = self.items[image_index]
        sample: dict[str, Any] = {
            "image_row": image_index,
            "caption_row": int(self.caption_offsets[image_index] + caption_index),
            "caption": item.captions[caption_index],
        }
        if len(key) > 2:  # the cached view of the image this epoch
            sample["image_view"] = key[2]
        if self.image_preprocessor is not None:
            sample["pixel_values"] = self.image_preprocessor.transform(load_image(item.image))
        return sample


class Collate:
    """Stacks a batch; tokenises captions when the text tower is live (in the worker)."""

    def __init__(self, text_preprocessor=None):
        self.text_preprocessor = text_preprocessor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image_row": torch.tensor([s["image_row"] for s in samples]),
            "caption_row": torch.tensor([s["caption_row"] for s in samples]),
        }
        if "image_view" in samples[0]:
            batch["image_view"] = torch.tensor([s["image_view"] for s in samples])
        if "pixel_values" in samples[0]:
            batch["image_inputs"] = {"pixel_values": torch.from_numpy(np.stack([s["pixel_values"] for s in samples]))}
        if self.text_preprocessor is not None:
            tokens = self.text_preprocessor([s["caption"] for s in samples])
            batch["text_inputs"] = {k: torch.from_numpy(v) for k, v in tokens.items()}
        return batch


def caption_offsets(items: list[CaptionedImage]) -> np.ndarray:
    """Row of each image's first caption in the flat list of all captions."""
    counts = np.array([len(item.captions) for item in items])
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
