"""Does an exported folder embed like the PyTorch model it came from? Measured on real inputs.

Both sides start from raw texts and PIL images: PyTorch through the bundle's preprocessors, the
export through the ones it saved and the onnx runtime, so a tokenizer or resize setting lost in
the export shows up here as well as a graph that computes something else.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..metrics import PARITY_MIN_COSINE
from ..errors import ParityError

MAX_NORM_ERROR = 1e-3  # the runtime promises unit vectors; cosine alone cannot see a lost normalisation

PROBE_TEXTS = (
    "dog",
    "a photo of a cat",
    "two children are playing with a red ball on the beach near the water",
    "Ein Café ☕ in Zürich, naïve résumé — 東京の夜景",
    " ".join(["a brown dog jumps over the white fence and runs through the green park"] * 12),  # truncated
)
PROBE_IMAGE_SIZES = ((224, 224), (64, 48), (500, 375), (375, 500), (1000, 180))


def probe_images(sizes=PROBE_IMAGE_SIZES, seed: int = 0) -> list[Image.Image]:
    """Photo-like test images: a smooth colour gradient with some noise and a bright square."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / width, y / height, 1 - x / width], axis=-1) * rng.uniform(120, 255, 3)
        pixels = base + rng.normal(0, 20, (height, width, 3))
        top, left = height // 4, width // 4
        pixels[top:top + height // 3, left:left + width // 3] = 250
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def batches(items: list) -> list[list]:
    """Each item alone (batch 1), then all of them together (one padded batch)."""
    return [[item] for item in items] + [list(items)]


@torch.inference_mode()
def torch_embed(model, tower: str, items: list) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in model.preprocess(tower, items).items()}
    return model.encode(tower, inputs).float().numpy()


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (unit * candidate).sum(axis=1) / np.linalg.norm(candidate, axis=1)
    return {
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "max_norm_error": float(np.abs(np.linalg.norm(candidate, axis=1) - 1.0).max()),
        "embeddings": int(len(cosine)),
    }


def measure(model, embedder, tower: str) -> dict[str, float]:
    """Compare ``embedder`` (an OnnxEmbedder) with ``model`` on the probe inputs of one tower."""
    items = list(PROBE_TEXTS) if tower == "text" else probe_images()
    run = embedder.embed_texts if tower == "text" else embedder.embed_images
    groups = batches(items)
    reference = np.concatenate([torch_embed(model, tower, group) for group in groups])
    candidate = np.concatenate([run(group) for group in groups])
    report = compare(reference, candidate)
    report["batch_sizes"] = sorted({len(group) for group in groups})
    return report


def require_parity(tower: str, report: dict[str, float]) -> None:
    if report["min_cosine"] < PARITY_MIN_COSINE or report["max_norm_error"] > MAX_NORM_ERROR:
        raise ParityError(
            f"the exported {tower} tower disagrees with PyTorch: minimum cosine {report['min_cosine']:.6f} "
            f"(need >= {PARITY_MIN_COSINE}) and norm error {report['max_norm_error']:.2g} over {report['embeddings']} "
            f"embeddings, so the export was not written"
        )
