"""Fusion strategies: several embeddings of one thing (an image and its caption) into one.

Strategies are plugins registered through ``register_fusion_strategies``; the built-ins live in
``mmretrieve.default_plugins.fusion``. This package holds the machinery they plug into:
``strategies`` (the interface), ``heads`` (trainable PyTorch heads), ``training`` (contrastive
training on cached embeddings), ``store`` (fusion bundles), ``onnx`` (export with a parity
check) and ``evaluation`` (the fused-item recall table).
"""

from __future__ import annotations

from typing import Any


def create_fusion(name: str, dim: int | None = None, **options: Any):
    """Build a registered fusion strategy; an unknown name raises with close matches."""
    from ..plugins import get_host

    return get_host().registry("fusion").get(name).build(dim=dim, **options)


def list_fusion_strategies(pattern: str | None = None) -> list[str]:
    from ..plugins import get_host

    return get_host().registry("fusion").names(pattern)


def is_trainable(name: str) -> bool:
    from ..plugins import get_host

    return get_host().registry("fusion").get(name).trainable
