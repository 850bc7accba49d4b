"""Keep the memory a training step frees inside the process, so that the next step does not fault it in again.

Why: a training step allocates and frees the same large tensors every step (the logits of one 4 x 128-token batch of
SmolLM2 are 100 MB in float32, their gradient as much again). glibc's malloc serves every block above its mmap
threshold (at most 32 MB) with fresh pages from the kernel and hands them back when the block is freed, and it trims
the top of its heap likewise, so every step pays a page fault for every 4 KB page of those tensors. On a virtual
machine a page fault is expensive: there a SmolLM2-135M step with a bf16 base and full-vocabulary logits took
1.9-3.3 s instead of 0.7 s, and one configuration's step times swung 2-3x from step to step (the benchmark suites,
which compute the LM head only at answer positions, gain less). jemalloc or tcmalloc (LD_PRELOAD) avoid it as well;
this does it with the allocator the process already has (`mallopt`: no mmap for large blocks, no trimming). The
price is that the process's resident memory stays at its peak, which is where a training process goes anyway.

`svdtune`'s commands and its benchmark workers call `keep_freed_memory()` once at start; a library user can call
`svdtune.keep_freed_memory()` before training.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes: the largest threshold mallopt takes (an int): free heap top is never given back


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring); True when it now does. A no-op
    returning False where the C library is not glibc (macOS, Windows, musl)."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
