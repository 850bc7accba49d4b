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


def check_creatable(path: Path) -> None:
    """Refuse a path that cannot become a directory because a file stands where one of its directories would be."""
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise FileExistsError(f"{ancestor} is a file, so the directory {path} cannot be created; choose "
                                      "another path")
            return


def write_atomic(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then move the file onto `target`: a killed process never leaves a torn file there.

    The temporary file is named after this process (`.NAME.PID-XXXX.tmp`); those of writers that died before their
    rename are removed by the next write of the same target, so killed runs do not pile up hidden files.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of `write_atomic` calls on `target` whose process is no longer running."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        pid = leftover.name[len(target.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
