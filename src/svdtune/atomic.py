"""Directories written whole: a process killed at any moment leaves the old complete directory or the new one.

Replacing the files of a directory one by one is not enough: a kill between two renames leaves new weights beside an
old config, and a loader cannot tell. So a directory is filled in a hidden temporary sibling, a manifest of every
file's size and sha256 is written last, and the sibling is switched into place in one step: an atomic exchange
(Linux `renameat2(RENAME_EXCHANGE)`), or, where that is unavailable, two renames with the old directory kept aside
until the new one is in place. Leftovers of a killed writer (a half-filled sibling, an old directory set aside) are
recognised by name and by the writer's process id, and cleaned up, or put back, by the next write of the same
target; siblings of a live writer are left alone, so concurrent writers never delete each other's work.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .paths import check_creatable, process_alive

MANIFEST = "manifest.json"
_NEW, _OLD = "new", "old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file in `directory` (the manifest itself excepted) in MANIFEST."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    target = directory / MANIFEST
    target.write_text(json.dumps({"files": files}, indent=2) + "\n")
    _fsync(target)


def manifest_problem(directory: Path) -> str | None:
    """What is wrong with `directory` against its manifest (a missing or changed file), or None if nothing. Other
    files (a README the user added) are not the writer's and are not checked.

    A missing manifest is reported as such: the caller decides whether an unverified directory is acceptable.
    """
    target = directory / MANIFEST
    if not target.is_file():
        return f"{MANIFEST} is missing"
    try:
        files = json.loads(target.read_text())["files"]
        expected = {name: (int(info["size"]), str(info["sha256"])) for name, info in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} is damaged"
    for name, (size, sha256) in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated or corrupt, or was edited ({path.stat().st_size} bytes, {size} were written)"
        if file_sha256(path) != sha256:
            return f"{name} is corrupt or was edited (its sha256 differs from the one recorded when it was written)"
    return None


def check_replaceable(target: Path, *, overwrite: bool) -> None:
    """Refuse to write directory `target` over a file, over a non-empty directory without `overwrite`, or over one
    holding subdirectories (which `write_directory` would not carry over)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a directory; choose another path")
    check_creatable(target)
    recover(target)  # a write killed half-way is finished or undone first
    present = sorted(target.iterdir()) if target.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True (--overwrite) to "
                              "replace it, or choose another path")
    folders = [p.name for p in present if p.is_dir()]
    if folders:
        raise FileExistsError(f"{target} holds directories ({', '.join(folders[:4])}) that replacing it would "
                              "delete; choose another path")


def write_directory(target: Path, fill: Callable[[Path], None], *, own: frozenset[str] | set[str] | None = None
                    ) -> Path:
    """Create or replace directory `target` as a whole: `fill(tmp)` writes the files into an empty temporary sibling,
    a manifest of them is added, and the sibling replaces `target` in one step. Returns `target`.

    With `own` (the names this writer makes), other files already in `target` (the user's notes, say) are carried
    into the new directory as hard links (copies where links are impossible) before the switch, so none is lost;
    without it the directory is replaced outright.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=_sibling_prefix(target, _NEW)))
    try:
        fill(tmp)
        write_manifest(tmp)
        for p in tmp.iterdir():
            _fsync(p)
        if own is not None and target.is_dir():
            _carry_over(target, tmp, set(own) | {MANIFEST})
        _switch(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the old directory
    _fsync_dir(parent)
    return target


def _carry_over(old: Path, new: Path, own: set[str]) -> None:
    """Link (or copy) every regular file of `old` not named in `own` into `new`."""
    for p in old.iterdir():
        if p.is_file() and not p.is_symlink() and p.name not in own and not (new / p.name).exists():
            try:
                os.link(p, new / p.name)
            except OSError:
                shutil.copy2(p, new / p.name)


def recover(target: Path) -> None:
    """Finish what a killed writer of `target` left: an old directory set aside goes back if `target` is missing,
    else it is removed; half-written temporary siblings are removed. Siblings of live writers are kept."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for kind in (_OLD, _NEW):
        for sibling in sorted(target.parent.glob(f"{_sibling_prefix(target, kind, pid=None)}*")):
            if _writer_alive(sibling.name):
                continue
            if kind == _OLD and not target.exists():
                os.rename(sibling, target)
            else:
                shutil.rmtree(sibling, ignore_errors=True)


def _switch(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target`; afterwards `tmp` holds the previous `target` (or nothing)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            return
        except OSError:  # created meanwhile by another writer: exchange with it below
            pass
    if _exchange(tmp, target):
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=_sibling_prefix(target, _OLD)))
    os.rmdir(aside)
    os.rename(target, aside)  # a kill from here to the next rename leaves `aside`, which `recover` puts back
    os.rename(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically where the platform can (Linux renameat2); False where it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _sibling_prefix(target: Path, kind: str, pid: int | None = -1) -> str:
    """`.NAME.new-PID-` / `.NAME.old-PID-` (pid -1: this process's; None: any writer's)."""
    owner = os.getpid() if pid == -1 else pid
    return f".{target.name}.{kind}-" + ("" if owner is None else f"{owner}-")


def _writer_alive(name: str) -> bool:
    """Whether the process that named a sibling `.NAME.KIND-PID-...` is still running (on this machine)."""
    try:
        pid = int(name.rsplit(".", 1)[1].split("-")[1])
    except (IndexError, ValueError):
        return False
    return process_alive(pid)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems cannot sync a directory; the rename itself is still atomic
        pass
