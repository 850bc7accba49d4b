"""What a benchmark result was measured on: code version, library versions, the CPU and its bf16 matrix units."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..hardware import bf16_units, cpu_name


def environment() -> dict[str, Any]:
    """What a result depends on besides its settings: code version, library versions, machine."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    import transformers

    return {"git_sha": sha, "svdtune": __version__, "torch": torch.__version__, "transformers":
            transformers.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": cpu_name(), "bf16_units": bf16_units(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def machine_label(env: dict[str, Any]) -> str:
    """One line naming what a run's timings are measured on, stored with each run: a resumed suite's runs may come
    from several machines and code versions, and its timings compare only within one label."""
    units = "+".join(env["bf16_units"]) or "no bf16 units"
    jobs = env.get("jobs", 1)
    side_by_side = f" x {jobs} runs at a time" if jobs > 1 else ""
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    return f"{env['processor']} ({units}), {threads}{side_by_side}, git {env['git_sha'][:10]}"
