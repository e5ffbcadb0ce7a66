"""Progress bars: always on stderr (stdout carries results), with rate and ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs):
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, **kwargs)
