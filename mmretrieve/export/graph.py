"""Tracing one tower, with its projection head and L2 normalisation, into an ONNX file."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from .manifest import TOWER_GRAPHS

MIN_OPSET = 17  # LayerNormalization is a single ONNX op from 17 on
# The TorchScript exporter's ceiling; it measured faster in onnxruntime than the dynamo one.
MAX_OPSET = 20
DEFAULT_OPSET = 18


class EmbeddingGraph(nn.Module):
    """What an ONNX tower computes: the model's encode_text / encode_image with positional inputs."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model = model
        self.tower = tower

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(TOWER_GRAPHS[self.tower]["inputs"], inputs))
        return self.model.encode(self.tower, named, normalize=True)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, not {opset}")
    return int(opset)


@torch.inference_mode(False)
def export_tower(model: nn.Module, tower: str, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``tower`` ("text" or "image") of a RetrievalModel (on CPU, in eval mode) to ``path``."""
    import onnx

    graph = TOWER_GRAPHS[tower]
    encoder = model.text_encoder if tower == "text" else model.image_encoder
    # Example batch of 2 (text: two lengths); the axes below stay symbolic, so any size runs.
    example = tuple(torch.from_numpy(encoder.example_inputs(batch=2)[name]) for name in graph["inputs"])
    dynamic_axes = {name: dict(encoder.dynamic_axes[name]) for name in graph["inputs"]}
    dynamic_axes[graph["output"]] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes turned into constants (fixed crop size)
        torch.onnx.export(EmbeddingGraph(model, tower).eval(), example, str(path), dynamo=False,
                          input_names=list(graph["inputs"]), output_names=[graph["output"]],
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True)
    onnx.checker.check_model(str(path), full_check=True)
