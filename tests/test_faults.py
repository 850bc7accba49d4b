"""Fault injection: a process killed at any write step leaves the old complete state or the new one, never a mix.

Each writer (adapter save, training checkpoint, factor-cache entry, PEFT export) runs in a forked child that SIGKILLs
itself at its k-th write step (creating a temporary file or directory, writing a file, syncing, renaming, removing),
for k = 1, 2, ... until the writer completes; at file writes a second pass also leaves the file torn (half its bytes)
before the kill. After every kill the parent checks the invariant on what is on disk, then that the next write of
the same target cleans every leftover up.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svdtune
from svdtune import atomic, export, io, linalg
from svdtune.io import WEIGHTS_FILE
from svdtune.train import checkpoint
from svdtune.train.checkpoint import CHECKPOINT_FILE, Progress, load_checkpoint, save_checkpoint

from helpers import make_model, train_steps

# (module, attribute) of every call that makes a write step; file writers can also be torn
STEP_CALLS = [(tempfile, "mkdtemp"), (tempfile, "mkstemp"), (os, "fsync"), (os, "rename"), (os, "replace"),
              (os, "rmdir"), (shutil, "rmtree"), (Path, "unlink"), (atomic, "_exchange")]
FILE_WRITERS = [(io, "save_file"), (checkpoint, "save_file"), (linalg, "save_file"), (export, "save_file"),
                (Path, "write_text")]


def crash_at(step: int, torn: bool) -> None:
    """Make this (child) process SIGKILL itself at its `step`-th write step; with `torn`, only at file writes, after
    writing half the file."""
    count = [0]

    def wrap(owner: object, name: str, writes_file: bool) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            if torn and not writes_file:
                return real(*args, **kwargs)
            count[0] += 1
            if count[0] != step:
                return real(*args, **kwargs)
            if torn:
                real(*args, **kwargs)
                target = Path(args[1] if owner is not Path else args[0])
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2]) if owner is not Path else \
                    os.truncate(target, target.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(owner, name, patched)

    for owner, name in STEP_CALLS:
        wrap(owner, name, False)
    for owner, name in FILE_WRITERS:
        wrap(owner, name, True)


def run_killed(write: Callable[[], None], step: int, torn: bool) -> bool:
    """Run `write` in a forked child killed at `step`; True if it was killed, False if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            # a forked child inherits the parent's OpenMP pool in a state it cannot use: a parallel region (an SVD,
            # say) would wait forever for threads that were not forked; one thread needs no pool
            torch.set_num_threads(1)
            crash_at(step, torn)
            write()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, "the writer failed instead of being killed"
    return os.WIFSIGNALED(status)


def every_crash(write: Callable[[], None], check: Callable[[], None],
                reset: Callable[[], None] = lambda: None) -> Iterator[int]:
    """Kill `write` at each of its steps (plain, then torn), call `check` after each kill; yields the kill count.
    `reset` restores the starting state before each pass."""
    kills = 0
    for torn in (False, True):
        reset()
        step = 1
        while run_killed(write, step, torn):
            check()
            kills += 1
            step += 1
        assert step > 1, "the writer made no write step at all"
    yield kills


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["exchange", "two renames"])
def switch(request, monkeypatch) -> str:
    """Both ways of switching a directory into place: the atomic exchange and the two-rename fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def adapter_pair(tmp_path: Path) -> tuple[torch.nn.Module, dict, dict, Path]:
    """A model whose adapter A is saved at tmp/adapter, trained on to B (not saved); A's and B's tensors."""
    model = svdtune.adapt(make_model(), "pissa", r=4, verbose=False)
    train_steps(model, steps=1)
    path = svdtune.save_adapter(model, tmp_path / "adapter")
    old = load_file(path / WEIGHTS_FILE)
    train_steps(model, steps=1)
    return model, old, tensors_of(model), path


def tensors_of(model: torch.nn.Module) -> dict:
    """Every adapter tensor of the model, keyed as in the weights file (copies)."""
    return {f"{n}.{k}": t.detach().clone() for n, a in svdtune.adapters(model).items()
            for k, t in a.adapter_tensors().items()}


def loaded_tensors(path: Path) -> dict:
    return tensors_of(svdtune.load_adapter(make_model(), path))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_adapter_save_leaves_old_or_new(tmp_path, switch) -> None:
    model, old, new, path = adapter_pair(tmp_path)
    outcomes = set()

    def check() -> None:
        state = loaded_tensors(path)  # loading also finishes or undoes the killed switch
        assert same(state, old) or same(state, new), "a killed save left a mix of two adapters"
        outcomes.add("new" if same(state, new) else "old")

    kills = next(every_crash(lambda: svdtune.save_adapter(model, path, overwrite=True), check))
    assert kills >= 10 and outcomes == {"old", "new"}
    svdtune.save_adapter(model, path, overwrite=True)
    assert same(loaded_tensors(path), new)
    assert hidden(tmp_path) == [], "temporary files and directories of killed saves must be cleaned up"


def test_killed_first_save_leaves_nothing_or_the_adapter(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    train_steps(model, steps=1)
    path = tmp_path / "adapter"

    def check() -> None:
        atomic.recover(path)
        assert not path.exists() or same(loaded_tensors(path), tensors_of(model))
        shutil.rmtree(path, ignore_errors=True)

    reset = lambda: shutil.rmtree(path, ignore_errors=True)  # noqa: E731
    assert next(every_crash(lambda: svdtune.save_adapter(model, path), check, reset)) >= 5
    reset()
    svdtune.save_adapter(model, path)
    assert hidden(tmp_path) == []


def test_killed_checkpoint_write_leaves_old_or_new(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, Progress(step=1), run={"lr": 1})
    seen = set()

    def check() -> None:
        progress = load_checkpoint(tmp_path, model, optimizer, scheduler, run={"lr": 1})
        assert progress.step in (1, 2)
        seen.add(progress.step)

    def write() -> None:
        save_checkpoint(tmp_path, model, optimizer, scheduler, Progress(step=2), run={"lr": 1})

    assert next(every_crash(write, check)) >= 2 and seen == {1, 2}
    write()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE], "no temporary checkpoint files left"


def test_killed_cache_write_is_recomputed_not_trusted(tmp_path) -> None:
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    exact = linalg.svd(W)

    def reset() -> None:
        for entry in tmp_path.glob("*.safetensors"):
            entry.unlink()

    def check() -> None:
        factors = linalg.Factorizer(tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(factors.svd(W), exact))
        reset()

    assert next(every_crash(lambda: linalg.Factorizer(tmp_path).svd(W), check, reset)) >= 2
    linalg.Factorizer(tmp_path).svd(W)
    assert hidden(tmp_path) == [] and len(list(tmp_path.iterdir())) == 1


def test_killed_export_leaves_old_or_new(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    train_steps(model, steps=1)
    out = tmp_path / "peft"
    svdtune.export_lora(model, out)
    old = load_file(out / export.PEFT_WEIGHTS)
    train_steps(model, steps=1)
    seen = set()

    def check() -> None:
        atomic.recover(out)
        assert atomic.manifest_problem(out) is None, "an export directory must be whole"
        state = load_file(out / export.PEFT_WEIGHTS)
        seen.add("old" if same(state, old) else "new")

    assert next(every_crash(lambda: svdtune.export_lora(model, out, overwrite=True), check)) >= 5
    assert seen == {"old", "new"}


def test_concurrent_saves_leave_one_whole_adapter(tmp_path) -> None:
    """Two processes saving different adapters to one path at once: the result is one of them, complete."""
    first = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    second = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    train_steps(first, steps=1)
    train_steps(second, steps=2)
    path = tmp_path / "adapter"
    children = []
    for model in (first, second, first, second):
        pid = os.fork()
        if pid == 0:
            try:
                torch.set_num_threads(1)  # as in run_killed: no OpenMP pool in a forked child
                for _ in range(5):
                    svdtune.save_adapter(model, path, overwrite=True)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    state = loaded_tensors(path)
    assert any(same(state, tensors_of(m)) for m in (first, second))
    assert hidden(tmp_path) == []
