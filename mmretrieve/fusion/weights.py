"""Modality weights for the untrained strategies: parsed, checked and normalised to sum to 1."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import ConfigError

MODALITIES = ("text", "image")  # the order of weights everywhere: text first, then image
DEFAULT_WEIGHTS = (0.5, 0.5)


def parse_weights(weights: str | Sequence[float] | None) -> np.ndarray:
    """``"0.3,0.7"`` or ``(0.3, 0.7)`` (text, image) as float64 weights summing to 1.

    Refused with one sentence: a wrong count, a non-number, NaN or infinity, a negative
    weight, or weights that are all zero (nothing left to rank by).
    """
    if weights is None:
        weights = DEFAULT_WEIGHTS
    if isinstance(weights, str):
        parts = [part.strip() for part in weights.split(",")]
        try:
            weights = [float(part) for part in parts]
        except ValueError:
            raise ConfigError(f"weights {','.join(parts)!r} must be numbers, one for text and one for image, "
                              f"e.g. 0.3,0.7") from None
    values = list(weights)
    if len(values) != len(MODALITIES):
        raise ConfigError(f"fusion takes {len(MODALITIES)} weights (text, image), got {len(values)}: {values}")
    try:
        values = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be numbers (text, image), got {values}") from None
    if not all(math.isfinite(value) for value in values):
        raise ConfigError(f"weights must be finite numbers (text, image), e.g. 0.3,0.7; got {values}")
    if any(value < 0 for value in values):
        raise ConfigError(f"weights must not be negative, got {values}")
    largest = max(values)
    if largest == 0:
        raise ConfigError("weights are all zero, so nothing would count; give text or image a positive weight")
    # Only the ratio counts. Scaling by the largest first keeps the sum finite: 1e308 + 1e308
    # overflows to infinity, and dividing by it would turn both weights into 0 (every score 0).
    scaled = np.asarray(values, dtype=np.float64) / largest
    return scaled / scaled.sum()
