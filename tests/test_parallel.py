"""`bench.parallel.exit_with_parent`: a worker of `svdtune bench --jobs N` ends with the process that started it, even
when that process is killed outright, so no orphan keeps training on the cores of the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = '''
import multiprocessing, os, sys, time
from svdtune.bench.parallel import exit_with_parent

def child(parent, path, bound):
    if bound:
        exit_with_parent(parent)
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    arguments = (os.getpid(), sys.argv[1], sys.argv[2] == "1")
    multiprocessing.get_context("spawn").Process(target=child, args=arguments).start()
    time.sleep(120)
'''


def running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def child_after_parent_killed(tmp_path: Path, bound: bool, wait_s: float) -> bool:
    """Start a parent that spawns a child, kill the parent with SIGKILL; whether the child still runs `wait_s`
    later."""
    script, pid_file = tmp_path / "parent.py", tmp_path / f"child-{bound}.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file), "1" if bound else "0"])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + wait_s
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = running(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        return alive
    finally:
        parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_its_parent_is_killed_and_only_then(tmp_path: Path) -> None:
    assert not child_after_parent_killed(tmp_path, bound=True, wait_s=10)
    assert child_after_parent_killed(tmp_path, bound=False, wait_s=2), "without exit_with_parent the child outlives its parent"


DYING = '''
import os, signal
from svdtune.bench.parallel import Work, WorkerDied, run_in_workers

def context(task):
    return task

def run(context, label, method, options, done, emit):
    if label == "victim":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    emit({"label": label})

if __name__ == "__main__":
    works = [Work("some-task", label, "lora", {}, []) for label in ("victim", "other")]
    try:
        run_in_workers(works, 2, context, run, lambda entry: print("emitted", entry["label"]))
    except WorkerDied as error:
        print("WorkerDied:", error)
'''


def test_a_worker_killed_mid_run_stops_the_suite_with_an_error_naming_what_was_left(tmp_path: Path) -> None:
    """A multiprocessing.Pool replaced a killed worker and waited forever for the run it held: the suite hung."""
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    died = next(line for line in done.stdout.splitlines() if line.startswith("WorkerDied:"))
    assert "victim on some-task" in died and "--jobs 1" in died and "resume" in died
