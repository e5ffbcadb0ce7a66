"""Progress bars: always on stderr (stdout carries results), with rate and ETA."""

from __future__ import annotations

import sys


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kwargs):
    from tqdm import tqdm  # here, not at import: tqdm loads importlib.metadata, which a search need not

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, **kwargs)
