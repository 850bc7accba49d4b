"""`allocator.keep_freed_memory`: freed blocks are reused without faulting their pages in again, and every svdtune
command sets it up before it trains."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from svdtune import allocator
from svdtune.cli import commands

LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not LINUX, reason="mallopt is glibc's")
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    assert allocator.keep_freed_memory()
    size = 64 * 2**20 // 4  # 64 MB of float32: above glibc's largest mmap threshold
    torch.empty(size).fill_(1.0)  # allocated, touched and freed: the heap now holds it
    before = minor_faults()
    torch.empty(size).fill_(2.0)
    assert minor_faults() - before < size * 4 // 4096 // 10  # a fresh mapping would fault in all 16,384 pages


def test_every_command_keeps_freed_memory_before_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(commands, "keep_freed_memory", lambda: called.append(True))
    assert commands.main(["methods"]) == 0
    assert called == [True]
