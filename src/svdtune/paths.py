"""Where svdtune keeps what it can recompute (SVD/QR factors, converted data sets): one root, one environment switch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """`$SVDTUNE_CACHE_DIR` if set, else `~/.cache/svdtune`."""
    root = os.environ.get("SVDTUNE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "svdtune"


def write_atomic(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then move the file onto `target`: a killed process never leaves a torn file there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
