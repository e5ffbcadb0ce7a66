"""Loading pretrained weights by hub id: from the local cache first, from the hub only when it
can be reached, and one sentence saying how to work offline when it cannot.

huggingface_hub retries an unreachable hub for about 30 s before it gives up; a short
connection check answers in a few seconds instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from typing import Callable, TypeVar
from urllib.parse import urlparse

from ..errors import InputError

T = TypeVar("T")
CONNECT_TIMEOUT_S = 3.0  # how long the reachability check waits for the hub (name lookup included)


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, default huggingface.co) opens in a few seconds."""
    if offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if not host:
        return False
    answer: list[bool] = []

    def connect() -> None:  # in a thread: a name lookup cannot be given a timeout
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            answer.append(True)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 0.5)
    return bool(answer)


@contextlib.contextmanager
def cache_only():
    """huggingface_hub (and transformers and timm through it) read the local cache and send nothing."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def unreachable_error(what: str) -> InputError:
    return InputError(f"{what} is not in the local model cache and cannot be downloaded (the model hub does not "
                      f"answer, or HF_HUB_OFFLINE is set); start from the offline model with "
                      f"`--init default`, give a local folder as `local-dir:PATH`, or download it once with network "
                      f"access (later runs can set HF_HUB_OFFLINE=1)")


def load_from_hub(load: Callable[[], T], what: str) -> T:
    """``load()`` from the local cache; failing that from the hub if it answers, else one sentence."""
    try:
        with cache_only():
            return load()
    except (OSError, ValueError):
        if not hub_reachable():
            raise unreachable_error(what) from None
    return load()
