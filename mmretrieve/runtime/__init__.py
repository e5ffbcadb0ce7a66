"""Inference runtimes for index, search and eval: what turns pixels and texts into vectors.

A runtime is a plugin (``register_runtimes``) whose factory takes ``(model_ref, device)`` and
returns an embedder with this shape:

    ref, fingerprint, embed_dim          which model, and its weights' identity
    image_preprocessor, text_preprocessor  torch-free preprocessing (mmretrieve.preprocess)
    embed_pixels(array) -> (n, d)         preprocessed images to normalised float32 rows
    embed_texts(list[str]) -> (n, d)      texts to normalised float32 rows
"""

from __future__ import annotations

from typing import Any


def load_embedder(model_ref: str, runtime: str = "auto", device: str | None = None) -> Any:
    from ..plugins import get_host

    registry = get_host().registry("runtime")
    name = "torch" if runtime == "auto" else runtime
    return registry.get(name).build(model_ref=model_ref, device=device)
