"""`allocator.keep_freed_memory`: a large freed block stays in the process's heap for the next step, instead of being
handed back to the kernel, and every svdtune command sets that up before it trains."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from svdtune import allocator
from svdtune.cli import commands

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK = 64 * 2**20  # bytes: above glibc's largest mmap threshold (32 MB), so by default mmap'd and unmapped on free


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h): the allocator's own account of its memory."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc >= 2.33")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_a_freed_large_block_stays_in_the_heap_for_reuse() -> None:
    assert allocator.keep_freed_memory()
    mapped_before = mallinfo().hblkhd
    block = torch.empty(BLOCK // 4).fill_(1.0)
    assert mallinfo().hblkhd - mapped_before < BLOCK, "the block was mmap'd: it would be unmapped on free"
    del block
    assert mallinfo().fordblks >= BLOCK, "the freed block was handed back to the kernel"


def test_every_command_keeps_freed_memory_before_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(commands, "keep_freed_memory", lambda: called.append(True))
    assert commands.main(["methods"]) == 0
    assert called == [True]
