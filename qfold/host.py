"""The process qfold runs in: glibc's allocator tuned for tensors that come and go every batch.

A forward pass allocates each layer's output and frees it a layer later. glibc serves requests
above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with fresh ``mmap`` pages and
returns freed memory above its trim threshold to the kernel, so every batch pays again for page
faults and for the kernel zeroing those pages. Raising both thresholds to 256 MiB keeps the
freed blocks in the heap for the next batch. On the issue-17 benchmark (2 cores) one FP32 pass
of resnet50 over 100 images at 224x224 went from 3.5 s to 2.6 s (1.37x); either threshold alone
does not help (the trim threshold alone is slower). The price: up to 256 MiB of freed memory may
stay in the process between passes instead of going back to the kernel.

The ``qfold`` command line applies it to its own process. A library cannot know what else a
process runs, so :func:`qfold.run_ptq` leaves the allocator alone; scripts call
:func:`tune_allocator` themselves, once, before the work.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
THRESHOLD_MIB = 256


def tune_allocator(threshold_mib: int = THRESHOLD_MIB) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_mib`` MiB for this process.

    Returns True when applied; False (and nothing changed) where the C library is not glibc
    (macOS, Windows, musl) or refuses a value.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = int(threshold_mib) << 20
    return bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, value))
