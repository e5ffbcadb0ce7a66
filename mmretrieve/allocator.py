"""glibc's allocator tuned for networks that allocate the same large buffers every forward.

By default glibc serves each allocation above 128 KiB-32 MiB with its own ``mmap`` and gives it
back with ``munmap`` when freed, and trims the heap's top after every large free: a PyTorch
forward pass then gets fresh pages for its activations each time and faults every one of them in
(~10,400 minor faults per image for the default model's image tower, system time above user
time). ``tune_allocator`` keeps freed memory in the process for the next forward instead
(``mallopt``: no per-buffer mmap, no trimming, the heap grown in 64 MiB steps), which is what
setting ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...`` would do.
benchmarks/allocator.py measures speed and peak memory with and without it.

It is called when the torch runtime or training starts. It does nothing on other C libraries
(macOS, Windows, musl), when the user set any ``MALLOC_*_`` variable or ``GLIBC_TUNABLES``
(their choice wins), or with ``MMRETRIEVE_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

TUNING_ENV = "MMRETRIEVE_MALLOC_TUNING"
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = (
    (M_MMAP_MAX, 0),  # large blocks come from the heap, reused, instead of a fresh mmap each time
    (M_TRIM_THRESHOLD, 1 << 30),  # keep up to 1 GiB of freed heap top instead of returning it at once
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time
)
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")

_tuned: bool | None = None


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator(env=None) -> bool:
    """Apply SETTINGS with mallopt once per process; True when they are in effect."""
    global _tuned
    if _tuned is not None:
        return _tuned
    env = os.environ if env is None else env
    chosen = [name for name in USER_VARIABLES if env.get(name)]
    libc = None if env.get(TUNING_ENV, "") == "0" or chosen else glibc()
    if libc is None:
        _tuned = False
        return False
    _tuned = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in SETTINGS)
    if not _tuned:
        log.debug("mallopt refused a setting; glibc's allocator keeps its defaults for the rest")
    return _tuned
