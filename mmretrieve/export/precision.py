"""Reduced-precision copies of an fp32 graph: int8 weights for CPUs, fp16 for GPUs."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

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
# With calibration images (`export --int8 --calibration IMAGES`) the image tower gets static int8
# instead: QDQ, weights per output channel, activation ranges from MinMax calibration on those
# images, on the convolutions and what runs between them (Clip: ReLU6, Add: residuals) only, so
# the head and the label bridge stay fp32. On the default model's EfficientNet-Lite0, calibrated
# on 64 flickr8k-train photos: 1.4-2.5x fp32 img/s at batch 32 (interleaved, loaded machine),
# cosine to fp32 0.993 mean on flickr8k-dev photos, and no R@K there lost more than 0.2 points
# (i2t R@1 +1.4); the recall gate judges it like any int8 export.
STATIC_IMAGE_SETTINGS = {"format": "QDQ", "op_types_to_quantize": ["Conv", "Clip", "Add"], "per_channel": True,
                         "activation_type": "QUInt8", "weight_type": "QInt8", "calibration": "MinMax"}
# Static int8 runs uint8 activations against int8 weights without reduce_range; onnxruntime warns
# that this may saturate on x86 CPUs without VNNI, so the export records whether its CPU had it.
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}
CPUINFO = Path("/proc/cpuinfo")
CALIBRATION_IMAGES = 64  # the first this many images of the folder, sorted by path
CALIBRATION_BATCH = 8  # images per calibration run (MinMax keeps every run's outputs: ~1.5 GB at 64)


def cpu_vnni() -> bool | str:
    """Whether this CPU has VNNI (its /proc/cpuinfo flags); "unknown" where they cannot be read
    (another OS, a CPU whose cpuinfo lists no x86 flags)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return bool(VNNI_FLAGS & set(value.split()))
    return "unknown"


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {key: value for key, value in INT8_SETTINGS.items() if key != "towers"}
    settings["weight_type"] = getattr(QuantType, INT8_SETTINGS["weight_type"])
    with _quiet_quantizer():
        quantize_dynamic(source, target, **settings)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    quantizer_log = logging.getLogger()  # the quantizer warns on the root logger about pre-processing
    level = quantizer_log.level
    quantizer_log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        quantizer_log.setLevel(level)


def quantize_image_static(source: Path, target: Path, batches: Callable[[], Iterator[dict]]) -> None:
    """``source`` (an image graph) with STATIC_IMAGE_SETTINGS at ``target``; ``batches()`` yields the
    calibration inputs, as the graph's input name -> array."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = batches()

        def get_next(self):
            return next(self.feeds, None)

    settings = STATIC_IMAGE_SETTINGS
    with tempfile.TemporaryDirectory(dir=Path(target).parent) as scratch, _quiet_quantizer():
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred, as the quantizer asks
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=settings["op_types_to_quantize"], per_channel=settings["per_channel"],
                        activation_type=getattr(QuantType, settings["activation_type"]),
                        weight_type=getattr(QuantType, settings["weight_type"]))


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


def reduces(precision: str, tower: str, int8_towers=None) -> bool:
    """Whether ``precision`` changes ``tower``'s graph (an int8 export leaves the image tower fp32
    unless it is calibrated; ``int8_towers`` names the towers an int8 export quantises)."""
    return precision != "int8" or tower in (INT8_SETTINGS["towers"] if int8_towers is None else int8_towers)


def reduce_precision(precision: str, source: Path, target: Path, tower: str | None = None,
                     calibration: Callable[[], Iterator[dict]] | None = None, int8_towers=None) -> None:
    """``source`` in ``precision`` at ``target``; a ``tower`` that precision does not speed up (or
    not in ``int8_towers``) is copied. ``calibration`` (the image tower's calibration batches)
    makes an int8 image tower static int8."""
    if tower is not None and not reduces(precision, tower, int8_towers):
        shutil.copyfile(source, target)
        return
    if precision == "int8" and tower == "image" and calibration is not None:
        quantize_image_static(source, target, calibration)
        return
    {"int8": quantize_int8, "fp16": convert_fp16}[precision](source, target)
