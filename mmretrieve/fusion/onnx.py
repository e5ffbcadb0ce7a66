"""A trained fusion head as an ONNX graph, checked against PyTorch before it is kept (the onnx
runtime runs it: ``mmretrieve.runtime.onnx_fusion``).

Inputs ``text`` and ``image`` (n, d) float32, output ``fused`` (n, d), normalised; n is dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ParityError
from ..metrics import PARITY_MIN_COSINE  # per fused embedding, fp32: the same bar as the towers' export
from .strategies import LearnedFusion

PROBE_BATCHES = (1, 7, 64)


def probe_inputs(dim: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    text, image = rng.normal(size=(2, rows, dim)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return unit(text), unit(image)


def fusion_parity(strategy: LearnedFusion, path: str | Path) -> dict[str, float]:
    """Min cosine between onnxruntime's and PyTorch's fused embeddings over several batch sizes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cosines = []
    for seed, rows in enumerate(PROBE_BATCHES):
        text, image = probe_inputs(strategy.dim, rows, seed)
        expected = strategy.fuse(text, image)
        (got,) = session.run(["fused"], {"text": text, "image": image})
        cosines.append((expected * got).sum(axis=1) / np.linalg.norm(got, axis=1))
    cosine = np.concatenate(cosines)
    return {"min_cosine": float(cosine.min()), "embeddings": int(len(cosine))}


def export_fusion_onnx(strategy: LearnedFusion, path: str | Path, opset: int = 17) -> dict[str, float]:
    """Write ``path`` (atomically) and return the parity report; raise ParityError below PARITY_MIN_COSINE."""
    import warnings

    import torch

    from ..atomic import write_bytes_atomic

    path = Path(path)
    staging = path.with_name(f".{path.name}.export")
    example = tuple(torch.from_numpy(x) for x in probe_inputs(strategy.dim, 2, 0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(strategy.head.eval(), example, str(staging), dynamo=False, input_names=["text", "image"],
                          output_names=["fused"], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={"text": {0: "batch"}, "image": {0: "batch"}, "fused": {0: "batch"}})
    try:
        report = fusion_parity(strategy, staging)
        if report["min_cosine"] < PARITY_MIN_COSINE:
            raise ParityError(f"the exported {strategy.name} head differs from PyTorch (min cosine "
                              f"{report['min_cosine']:.6f} < {PARITY_MIN_COSINE}); not written")
        write_bytes_atomic(path, staging.read_bytes())
    finally:
        staging.unlink(missing_ok=True)
    return report
