"""What this machine's processor does fast: the bf16 matrix units that make a bf16 base worth holding.

Why it matters: a bf16 base trains faster than float32 only where bf16 products run in hardware (x86 AMX or
AVX-512 BF16, Arm's BF16 extension, a GPU). Elsewhere PyTorch emulates them, and a bf16 product is tens of times
slower than the float32 one (a 512x576 by 576x1536 product: 35x on an AVX2-only EPYC), so a bf16 run that takes an
hour on one CPU takes a day on another. A bf16 base avoids that there (`upcast.bf16_products`); bf16 autocast
cannot, and `slow_bf16_warning` says so before such a run starts.
"""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch

# /proc/cpuinfo flags of bf16 matrix instructions: x86 AMX and AVX-512 BF16, Arm's BF16 extension ("Features")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo (read once: the processor does not change under a process); empty
    where there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for key, sep, value in (line.partition(":") for line in lines):
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 "flags", Arm "Features"); None where they cannot be read."""
    line = cpuinfo().get("flags", cpuinfo().get("Features"))
    return set(line.split()) if line is not None else None


def bf16_units() -> list[str]:
    """The CPU's bf16 matrix instructions (empty when it has none or they cannot be read)."""
    return sorted(BF16_FLAGS & (cpu_flags() or set()))


def cpu_name() -> str:
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def bf16_emulated(device: torch.device | str) -> bool:
    """True when bf16 products on `device` are known to be emulated: a CPU whose flags are readable and name no bf16
    matrix unit. Unknown CPUs (no /proc/cpuinfo) and GPUs are given the benefit of the doubt."""
    flags = cpu_flags()
    return torch.device(device).type == "cpu" and flags is not None and not BF16_FLAGS & flags


def slow_bf16_warning(device: torch.device | str, what: str) -> str | None:
    """The warning for `what` (e.g. "a bf16 base") on a device that emulates bf16, issued and returned; else None."""
    if not bf16_emulated(device):
        return None
    message = (f"{what} on {cpu_name()}, which has no bf16 matrix units (AMX, AVX-512 BF16 or Arm BF16): PyTorch "
               "emulates bf16 products here, tens of times slower than float32. Train in float32 on this machine "
               "(drop --bf16), or use a CPU with those units or a GPU")
    warnings.warn(message, stacklevel=3)
    return message
