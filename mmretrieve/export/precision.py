"""Reduced-precision copies of an fp32 graph: int8 weights for CPUs, fp16 for GPUs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import ExportError

# Dynamic int8 (weights quantised ahead, activations at run time), per output channel, on
# MatMul only. Measured on MiniLM here: the default settings (per-tensor, every op) moved
# embeddings to mean cosine 0.962; per-channel MatMul kept 0.992 and ran ~1.4-2x faster.
# Convolutions stay fp32: ConvInteger ran EfficientNet-Lite0 6x slower at cosine 0.84.
# Only towers where int8 measured faster are quantised (benchmarks/int8_towers.py): the text
# tower ran 1.7x faster; the image tower, whose only MatMul is its head, ran 0.93-0.95x (batch 32)
# and 0.69x (batch 1) of fp32, so an int8 export keeps it fp32.
INT8_SETTINGS = {"op_types_to_quantize": ["MatMul"], "per_channel": True, "weight_type": "QInt8",
                 "towers": ["text"]}


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {key: value for key, value in INT8_SETTINGS.items() if key != "towers"}
    settings["weight_type"] = getattr(QuantType, INT8_SETTINGS["weight_type"])
    quantizer_log = logging.getLogger()  # the quantizer warns on the root logger about pre-processing
    level = quantizer_log.level
    quantizer_log.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(source, target, **settings)
    finally:
        quantizer_log.setLevel(level)


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and arithmetic, fp32 inputs and outputs, so the runtime feeds the same arrays.

    Uses the converter that ships inside onnxruntime (onnxruntime.transformers.float16, the same
    code as onnxconverter-common), so no extra package is needed.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:
        raise ExportError(f"fp16 conversion needs onnxruntime's transformers tools ({exc})") from None
    model = OnnxModel(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    # The converter appends the input casts after their consumers; onnx.checker wants graph order.
    model.topological_sort()
    onnx.save(model.model, str(target))


def reduces(precision: str, tower: str) -> bool:
    """Whether ``precision`` changes ``tower``'s graph (an int8 export leaves the image tower fp32)."""
    return precision != "int8" or tower in INT8_SETTINGS["towers"]


def reduce_precision(precision: str, source: Path, target: Path, tower: str | None = None) -> None:
    """``source`` in ``precision`` at ``target``; a ``tower`` that precision does not speed up is copied."""
    if tower is not None and not reduces(precision, tower):
        shutil.copyfile(source, target)
        return
    {"int8": quantize_int8, "fp16": convert_fp16}[precision](source, target)
