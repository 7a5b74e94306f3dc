"""Keep glibc from returning large freed blocks to the OS between inference batches.

glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh mmap calls and
unmaps them on free, so every batch of frames or activations of that size page-faults its memory in
again: measured here, converting 8 decoded 1080p frames to float took 52 ms that way and 9 ms with
the threshold raised (the 128×128×64 convolution of the landmark model: 11 → 1.8 ms). Raising the
mmap and trim thresholds makes freed blocks reusable instead; the price is that the process keeps
its peak heap, which stays bounded because decoding and inference work in fixed-size batches.
This is process-wide and only done on Linux with glibc; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 512 << 20

log = logging.getLogger(__name__)
_done = False


def keep_freed_memory_for_reuse() -> bool:
    """Raises glibc's mmap/trim thresholds once per process; returns whether it is in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    if not ok:
        log.warning("mallopt refused the thresholds; inference will page-fault large buffers")
    _done = ok
    return ok
