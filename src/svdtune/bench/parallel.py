"""Several configurations of a suite at once, each in its own worker process with its share of the CPU threads.

Why: one short run of a small model cannot keep every core busy (its products are small, and the Python between
them runs on one thread), so two single-threaded runs side by side can finish sooner than one two-threaded run at a
time. Measured on a 2-core AVX2 CPU (`benchmarks/bench_jobs.py`, both ways in one invocation): the whole default
suite (42 runs, 15 configurations) took 593 s one at a time and 469 s two at a time (1.26x), with identical scores;
a 6-configuration slice of it gained nothing (0.99x), since its last configuration runs alone on one thread. The
configurations of a suite are independent (each has its own grid, seeds and finals), so a configuration is the unit
of work; the protocol is unchanged.

Workers are spawned, not forked (a fork of a process whose OpenMP pool has run can hang), so what they receive must
be picklable: the suite, the rows, and a loader that is a module-level function. Each finished run is sent back at
once through a manager queue and saved by the parent alone (one writer of results.json), so an interrupted suite
resumes from its last finished run, as a serial one does. Runs are seeded as in a serial suite; only the thread
count differs, which can change float reductions in the last bits. A worker (and the manager process) ends with the
process that started it (`exit_with_parent`): a killed `svdtune bench` leaves no orphan training on, unseen, on the
cores of the next run. The other way round, a worker that dies (killed by the system when memory runs out, or one
that cannot start) stops the suite with an error naming the configurations left: the workers run in a
`concurrent.futures.ProcessPoolExecutor`, which reports such a death to every pending run, where a
`multiprocessing.Pool` silently replaces the worker and waits forever for the run it held.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.managers import SyncManager
from typing import Any

import torch

from ..allocator import keep_freed_memory
from ..errors import UserError

Entry = dict[str, Any]


@dataclass(frozen=True)
class Work:
    """One configuration of one task, as a worker needs it (everything picklable)."""

    task: str
    label: str
    method: str
    options: dict[str, Any]
    done: list[Entry]  # its runs already finished (resume)


def auto_jobs(cpus: int | None = None, memory_gb: float | None = None) -> int:
    """How many runs at a time `--jobs auto` takes: one per core up to 4, and at most one per 4 GB of memory (a
    SmolLM2-135M full fine-tuning run holds about 2.5 GB)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory_gb = memory_gb if memory_gb is not None else available_memory_gb()
    return max(1, min(cpus, 4, int(memory_gb // 4)))


def available_memory_gb() -> float:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0  # unknown: assume a small machine


def threads_per_job(jobs: int) -> int:
    return max(1, torch.get_num_threads() // jobs)


def check_picklable(load: Callable) -> None:
    try:
        pickle.dumps(load)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(f"jobs > 1 runs configurations in worker processes, which must import the model loader by "
                         f"name: {load!r} is not a module-level function ({error}). Pass jobs=1, or a loader defined "
                         "at the top level of a module") from error


_QUEUE: Any = None


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies


def exit_with_parent(parent: int) -> None:
    """End this process when its parent `parent` (a pid) dies, however it dies (SIGKILL included): on Linux the
    kernel sends SIGTERM (prctl PR_SET_PDEATHSIG); a parent already gone by now ends it at once. Elsewhere, no-op."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def start_worker(results: Any, threads: int, parent: int) -> None:
    global _QUEUE
    exit_with_parent(parent)
    _QUEUE = results
    torch.set_num_threads(threads)
    keep_freed_memory()  # a spawned worker starts with the C library's defaults again


def run_work(make_context: Callable[[str], Any], run: Callable[..., None], work: Work) -> None:
    """In a worker: run one configuration, sending each finished run to the parent."""
    run(make_context(work.task), work.label, work.method, work.options, work.done, _QUEUE.put)


@contextmanager
def quiet_children() -> Iterator[None]:
    """Workers draw no progress bars (two processes' bars would interleave; the parent draws one for all)."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


def run_in_workers(works: Sequence[Work], jobs: int, make_context: Callable[[str], Any], run: Callable[..., None],
                   emit: Callable[[Entry], None]) -> None:
    """Run `run(context, label, method, options, done, emit)` for every work item, `jobs` at a time, calling `emit`
    in this process for each finished run as it arrives. A failed configuration stops the suite (the workers are
    ended; every run finished before is emitted) and its error is raised here; a worker that dies outright raises
    `WorkerDied`."""
    spawn = multiprocessing.get_context("spawn")
    manager = SyncManager(ctx=spawn)
    manager.start(exit_with_parent, (os.getpid(),))
    with quiet_children(), manager:
        results = manager.Queue()
        not_workers = set(multiprocessing.active_children())  # the manager's process
        executor = ProcessPoolExecutor(jobs, mp_context=spawn, initializer=start_worker,
                                       initargs=(results, threads_per_job(jobs), os.getpid()))
        try:
            pending = {executor.submit(run_work, make_context, run, work): work for work in works}
            while pending:
                forward(results, emit, wait_s=0.5)
                for future in [f for f in pending if f.done()]:
                    raise_failure(future, pending.values())
                    del pending[future]
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            for worker in set(multiprocessing.active_children()) - not_workers:
                worker.terminate()
            raise
        finally:
            executor.shutdown(wait=True)
            forward(results, emit)  # a put returns once the manager holds the run: nothing finished is lost


class WorkerDied(UserError):
    """A worker process ended without finishing its configuration (killed, or unable to start): the command line
    prints it as one line, since the fix (memory, fewer jobs) is the user's."""


def raise_failure(future: Future, unfinished: Iterable[Work]) -> None:
    """Raise the error of a finished configuration, if any: its own, or `WorkerDied` when a worker died (which one
    ran where is not known then: the error lists every configuration left unfinished)."""
    try:
        future.result()
    except BrokenProcessPool as error:
        left = ", ".join(f"{work.label} on {work.task}" for work in unfinished)
        raise WorkerDied(
            f"a worker process ended before its run was done, killed (most often by the system when memory runs "
            f"out: each worker holds its own copy of the model) or unable to start; unfinished: {left}. The "
            f"runs finished before are saved: run the same command again to resume, with fewer runs at a time "
            f"(--jobs 1) if memory is short") from error


def forward(results: Any, emit: Callable[[Entry], None], wait_s: float = 0.0) -> None:
    """Emit every run waiting in the queue (waiting up to `wait_s` for the first)."""
    while True:
        try:
            entry = results.get(timeout=wait_s) if wait_s else results.get_nowait()
        except queue.Empty:
            return
        emit(entry)
        wait_s = 0.0
