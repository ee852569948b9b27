"""qfold.host: the allocator tuning the command line applies to its own process."""
from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from qfold.host import THRESHOLD_MIB, tune_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(not GLIBC, reason="mallopt and mallinfo2 are glibc's; elsewhere tune_allocator does nothing")
def test_tensors_below_the_threshold_come_from_the_heap_not_from_mmap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2 to read the mmapped bytes")
    libc.mallinfo2.restype = _MallInfo2
    assert tune_allocator()
    before = libc.mallinfo2().hblkhd
    t = torch.ones((THRESHOLD_MIB // 4) << 20, dtype=torch.uint8)  # 64 MiB: mmapped by glibc's default (max 32 MiB)
    assert libc.mallinfo2().hblkhd - before < 1 << 20
    del t


@pytest.mark.skipif(GLIBC, reason="on glibc the tuning applies")
def test_tuning_is_a_no_op_off_glibc() -> None:
    assert tune_allocator() is False
