"""Multimodal items: an image and its caption (or title) as one fused vector.

Every strategy comes down to one vector per item (or per multimodal query). Late fusion's item is
the weighted sum v = w_txt · f_txt + w_img · f_img, whose inner product with a query is exactly the
weighted sum of the two similarities. The other strategies fuse as they always do. How an index
stores such items (late ones completed to unit vectors, captions recorded) is
``mmretrieve.index.fused``.
"""

from __future__ import annotations

import numpy as np

from .strategies import FusionStrategy, check_pair


def fuse_items(strategy: FusionStrategy, text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """One vector per (text, image) pair; late fusion's is the weighted sum (see the module doc)."""
    if strategy.late:  # resolve_fusion made sure a late strategy here has weights
        text, image = check_pair(text, image)
        return (strategy.weights[0] * text + strategy.weights[1] * image).astype(np.float32)
    return strategy.fuse(text, image)
