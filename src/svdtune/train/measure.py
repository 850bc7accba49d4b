"""Peak memory of a block of work: the allocator's peak on a GPU, the process's peak RSS on a CPU.

On Linux the kernel's RSS high-water mark (VmHWM) can be reset by writing 5 to /proc/self/clear_refs, so several runs
in one process each get their own peak; elsewhere the process-wide peak (ru_maxrss) is reported, an upper bound.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_peak_mb() -> float:
    if STATUS.exists():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_mb`."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                CLEAR_REFS.write_text("5")
            except OSError:
                pass  # not Linux, or not permitted: the process-wide peak is reported instead
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = _rss_peak_mb()
