"""Tracing one tower, with its projection head and L2 normalisation, into an ONNX file."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from .manifest import FLOAT_IMAGE_GRAPH, TOWER_GRAPHS, input_dtype

MIN_OPSET = 17  # LayerNormalization is a single ONNX op from 17 on
# The TorchScript exporter's ceiling; it measured faster in onnxruntime than the dynamo one.
MAX_OPSET = 20
DEFAULT_OPSET = 18


class PixelNormalization(nn.Module):
    """uint8 (n, h, w, 3) -> normalised float32 (n, 3, h, w) inside the graph: the bytes put in
    channel order first (a quarter of the float transpose's traffic), then cast, scaled to [0, 1]
    and normalised with the float32 operations ``ImagePreprocessor.normalize``'s table was made
    with (division, subtraction, division: exactly rounded), so the tower sees bit for bit the
    input the torch runtime gives it. Measured in onnxruntime on 2 loaded cores: 1.4 ms per 224 px
    image, against 4.7-4.8 ms when the float output was transposed (arithmetic or a table Gather)."""

    def __init__(self, preprocessor):
        super().__init__()
        config = preprocessor.config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).reshape(3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).reshape(3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - self.mean) / self.std


class EmbeddingGraph(nn.Module):
    """What an ONNX tower computes: the model's encode_text / encode_image with positional inputs;
    given the image ``preprocessor``, the image tower takes uint8 pixels and normalises them first."""

    def __init__(self, model: nn.Module, tower: str, preprocessor=None):
        super().__init__()
        self.model = model
        self.tower = tower
        self.normalization = PixelNormalization(preprocessor) if preprocessor is not None else None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.normalization is not None:
            name = self.model.image_encoder.input_names[0]
            return self.model.encode(self.tower, {name: self.normalization(inputs[0])}, normalize=True)
        names = TOWER_GRAPHS[self.tower]["inputs"] if self.tower == "text" else FLOAT_IMAGE_GRAPH["inputs"]
        named = dict(zip(names, inputs))
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
    uint8 = input_dtype(graph) == "uint8"
    if uint8:  # (2, size, size, 3) bytes; the graph normalises them (PixelNormalization)
        size = encoder.preprocessor.config.size
        generator = torch.Generator().manual_seed(0)
        example = (torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=generator),)
        dynamic_axes = {graph["inputs"][0]: {0: "batch"}}
    else:
        # Example batch of 2 (text: two lengths); the axes below stay symbolic, so any size runs.
        example = tuple(torch.from_numpy(encoder.example_inputs(batch=2)[name]) for name in graph["inputs"])
        dynamic_axes = {name: dict(encoder.dynamic_axes[name]) for name in graph["inputs"]}
    dynamic_axes[graph["output"]] = {0: "batch"}
    module = EmbeddingGraph(model, tower, encoder.preprocessor if uint8 else None)
    with warnings.catch_warnings(), torch.no_grad(), encoder.export_context():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes turned into constants (fixed crop size)
        torch.onnx.export(module.eval(), example, str(path), dynamo=False,
                          input_names=list(graph["inputs"]), output_names=[graph["output"]],
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True)
    onnx.checker.check_model(str(path), full_check=True)
