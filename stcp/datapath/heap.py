"""How the C library's malloc keeps freed memory, tuned once per process for bulk receive.

Each receive batch allocates a few large buffers and frees them before the next: up to 64
datagrams of up to 64 KiB from recvmmsg, then one plaintext buffer of the whole batch from
RecordCipher.open_records. With glibc's defaults (a buffer over 128 KiB is mmapped, and
freed memory at the top of the heap above twice that is given back), those buffers came
from fresh pages on most batches: a bulk transfer through a server took one page fault per
4 KiB received at worst (28,000-94,000 per 256 MiB, `perf stat`), about a quarter of the
server's CPU. Keeping buffers up to a whole batch on the heap, and up to two batches of
freed memory in the process, leaves a few thousand in a process's first transfer and
under a few dozen after.

Process-wide, so applied when the first datapath driver starts, not at import; never when
the operator has set glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (that is
the way to opt out), and only on glibc (elsewhere it does nothing).
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Optional

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20     # a whole receive batch (64 x 64 KiB) stays on the heap
TRIM_THRESHOLD = 8 << 20     # freed memory kept before it is given back: two such batches
OPT_OUT_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
applied: Optional[bool] = None     # None until tried; then whether the thresholds were set


def tune_heap() -> bool:
    """Set the thresholds above, once per process; True if they are in force from this call
    or an earlier one."""
    global applied
    if applied is None:
        with _lock:
            if applied is None:
                applied = _apply()
    return applied


def _apply() -> bool:
    if any(v in os.environ for v in OPT_OUT_VARIABLES) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either turns off glibc's own threshold tuning
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
