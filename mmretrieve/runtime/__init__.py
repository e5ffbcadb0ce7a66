"""Inference runtimes for index, search and eval: what turns pixels and texts into vectors.

A runtime is a plugin (``register_runtimes``) whose factory takes ``(model_ref, device)`` and
returns an embedder with this shape:

    ref, fingerprint, embed_dim          which model, and its weights' identity
    image_preprocessor, text_preprocessor  torch-free preprocessing (mmretrieve.preprocess)
    embed_pixels(array) -> (n, d)         preprocessed images (uint8 (n, h, w, 3) from resize_crop, or
                                          normalised float32 (n, 3, h, w)) to normalised float32 rows
    embed_texts(list[str]) -> (n, d)      texts to normalised float32 rows

``model_ref`` is a model bundle (or registered model name) or an ONNX export folder
(`mmretrieve export`); runtime "auto" picks onnx for an export when onnxruntime imports, else torch.

This module is the runtimes' factory (``load_embedder``, through the runtime registry, like
``create_encoder`` for encoders): the index reader calls it, so it imports nothing above the index
and export layer, and never a runtime module; the runtimes themselves are its submodules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np


def choose_runtime(model_ref: str, runtime: str = "auto") -> str:
    from ..export.manifest import is_export

    if runtime != "auto":
        if runtime == "torch" and is_export(model_ref):
            from ..errors import ExportError

            raise ExportError(f"{model_ref} is an ONNX export, which the torch runtime cannot load; use "
                              f"--runtime onnx (or auto), or give the bundle it was exported from")
        return runtime
    if is_export(model_ref):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            from ..errors import InputError

            raise InputError(f"{model_ref} is an ONNX export and onnxruntime is not installed; install it with "
                             f"`pip install mmretrieve[cpu]`, or give the bundle it was exported from") from None
        return "onnx"
    return "torch"


def load_embedder(model_ref: str, runtime: str = "auto", device: str | None = None) -> Any:
    """The runtime's embedder for ``model_ref``; a path reaches the factory absolute (``~`` expanded),
    so the ``ref`` an index records is found again from any working folder."""
    from ..bundle import resolve_model_ref
    from ..errors import InputError
    from ..plugins import get_host

    model_ref = resolve_model_ref(model_ref)
    spec = get_host().registry("runtime").get(choose_runtime(model_ref, runtime))
    embedder = spec.build(model_ref=model_ref, device=device)
    # Checked on the class, so properties that load a tower on first use are not touched.
    missing = [name for name in ("embed_texts", "embed_pixels") if not callable(getattr(type(embedder), name, None))]
    if missing:
        raise InputError(f"runtime {spec.name!r} (plugin {spec.plugin!r}) built a {type(embedder).__name__}, which has "
                         f"no {' or '.join(missing)}; a runtime must build an embedder (EmbedderProtocol in "
                         f"mmretrieve/hookspecs.py)")
    return embedder


def embed_by_length(feeds: dict[str, np.ndarray], run: Callable[[dict[str, np.ndarray]], np.ndarray], dim: int,
                    size: int) -> np.ndarray:
    """Tokenised texts embedded in runs of ``size`` similar lengths, each run cut to its longest
    text (tokenizers pad on the right), so no compute goes to padding; rows come back in order."""
    import numpy as np

    lengths = feeds["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = np.empty((len(lengths), dim), dtype=np.float32)
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        width = int(lengths[rows].max())
        out[rows] = run({name: np.ascontiguousarray(array[rows, :width]) for name, array in feeds.items()})
    return out
