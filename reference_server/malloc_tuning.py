"""Keep freed memory for the next capture: glibc's allocator, told once per server process.

Why: a capture keeps one chunk per step (a 151,936-wide head: 600 KB a step). glibc serves
such blocks with fresh ``mmap`` pages, or trims the heap's top when they are freed, so every
request has the kernel map its whole capture anew, page by page; on a virtual machine each
new page costs microseconds, and a 19 MiB capture paid about 40 ms of a 620 ms request for it
(docs/performance.md). Two ``mallopt`` settings keep the memory: blocks under 64 MiB come
from the heap, and up to 512 MiB freed at its top stay mapped for reuse. The cost: resident
memory stays up to that much above what is in use after a large capture (it is reused, not
lost). glibc on Linux only; elsewhere nothing is changed. ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` in the environment, glibc's own variables, win over these.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 512 * 2**20


def keep_freed_memory() -> bool:
    """Apply the two settings (unless the environment sets them); whether they were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    applied = False
    for option, value, variable in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
                                    (M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):
        if variable in os.environ:
            continue
        applied = bool(mallopt(ctypes.c_int(option), ctypes.c_int(value))) or applied
    if applied:
        log.debug("malloc: blocks under %d MiB from the heap, up to %d MiB freed kept for reuse",
                  MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return applied
