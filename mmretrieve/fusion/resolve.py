"""Finding the strategy a command asked for, ready to fuse one embedder's embeddings.

Untrained strategies are built from their weights. A trained one needs its head: the fusion
bundle given, or the one stored in the model itself (``MODEL/fusion/<strategy>/``, written by
`mmretrieve train-fusion` and carried into exports). The embedder's runtime loads the head
(``embedder.load_fusion_head(folder)``): the onnx runtime runs it in onnxruntime, so indexing and
search stay free of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .strategies import FusionStrategy


def fusion_spec(name: str):
    from ..plugins import get_host

    return get_host().registry("fusion").get(name)


def resolve_fusion(embedder, name: str, weights: str | Sequence[float] | None = None,
                   fusion_bundle: str | Path | None = None, one_vector: bool = True) -> FusionStrategy:
    """The strategy ``name`` for ``embedder``'s model; a trained head for another model is refused.

    ``one_vector``: the caller needs one vector per item or query (an index, a search), so a late
    strategy must say how it weighs the two similarities (``weights``); `eval --fused` scores
    late strategies their own way and passes False.
    """
    spec = fusion_spec(name)
    if not spec.trainable:
        if fusion_bundle is not None:
            raise ConfigError(f"{spec.name} has nothing trained, so it takes no fusion bundle; "
                              f"a fusion bundle goes with a trained strategy (concat-projection, gated)")
        strategy = spec.build(dim=int(embedder.embed_dim), weights=weights)
        if one_vector and strategy.late and getattr(strategy, "weights", None) is None:
            raise ConfigError(f"{spec.name} combines similarities its own way, which one vector per item or query "
                              f"cannot hold; use mean, or compare it with `mmretrieve eval --fused`")
        return strategy
    if weights is not None:
        raise ConfigError(f"{spec.name} learns how to weigh text and image, so it takes no weights; "
                          f"weights apply to late and mean")
    folder = Path(fusion_bundle) if fusion_bundle is not None else _attached(embedder, spec.name)
    load_head = getattr(embedder, "load_fusion_head", None)
    if load_head is not None:  # each runtime runs heads its own way (onnx: in onnxruntime, without torch)
        strategy = load_head(folder)
    else:  # a runtime that does not say: the head in PyTorch
        from .store import load_fusion

        strategy = load_fusion(folder, base_fingerprint=embedder.fingerprint)
    if strategy.name != spec.name:
        raise ConfigError(f"{folder} holds a {strategy.name} head, not {spec.name}")
    strategy.source = str(folder.resolve())
    return strategy


def _attached(embedder, strategy: str) -> Path:
    from .store import attached_heads

    heads = attached_heads(getattr(embedder, "path", embedder.ref))
    if strategy not in heads:
        raise ConfigError(f"{strategy} is a trained strategy and model {embedder.ref} has no {strategy} head; train "
                          f"one with `mmretrieve train-fusion --model MODEL --data CAPTIONS`, or pass --fusion-bundle")
    return heads[strategy]
