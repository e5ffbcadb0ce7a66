"""Importing onnxruntime with one sentence when it is missing (shared by the embedder and the fusion heads)."""

from __future__ import annotations

from ..errors import InputError


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InputError("the onnx runtime needs onnxruntime; install it with `pip install mmretrieve[cpu]` "
                         "(or mmretrieve[gpu] for CUDA)") from None
    return onnxruntime
