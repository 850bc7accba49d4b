"""What `svdtune bench --jobs` buys: the same configurations of a suite run one at a time (every thread to one run)
and `--jobs` at a time (each worker with its share of the threads), side by side in one invocation, as a ratio of
wall times, with a check that both made the same runs with the same scores.

The runs are the suite's own (same rows, steps, grid and seeds), all of them or those of `--methods`; each mode
writes to a fresh temporary directory, and with `--rounds 2` the second round runs the modes in the opposite order,
so that a drift of the machine's speed does not favour one of them.

    python benchmarks/bench_jobs.py [--suite default] [--methods lora pissa ...] [--jobs 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import markdown_table, write_result

from svdtune.bench.runner import run_suite
from svdtune.bench.suites import SUITES


def timed_suite(suite: Any, jobs: int) -> tuple[float, dict[tuple, float]]:
    """Wall seconds of the whole suite and each run's score by (task, label, stage, seed, lr)."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        results = run_suite(suite, Path(out), resume=False, progress=False, jobs=jobs)
        seconds = time.perf_counter() - started
    return seconds, {(r["task"], r["label"], r["stage"], r["seed"], r["lr"]): r["score"] for r in results["runs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="*", default=[], help="methods and references to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="2: the second round runs the modes in reverse order")
    parser.add_argument("--out", default="benchmarks/results/bench_jobs.json")
    args = parser.parse_args()
    start = time.perf_counter()
    suite = dataclasses.replace(SUITES[args.suite], methods=tuple(args.methods))
    modes = {"one at a time": 1, f"{args.jobs} at a time": args.jobs}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    scores: dict[str, dict[tuple, float]] = {}
    for round_ in range(args.rounds):
        for mode in (list(modes) if round_ % 2 == 0 else list(modes)[::-1]):
            took, scores[mode] = timed_suite(suite, modes[mode])
            seconds[mode].append(took)
    serial, parallel = scores["one at a time"], scores[f"{args.jobs} at a time"]
    same_runs = serial.keys() == parallel.keys()
    largest_gap = max((abs(serial[k] - parallel[k]) for k in serial if k in parallel), default=float("nan"))
    base = min(seconds["one at a time"])
    rows = [[mode, modes[mode], max(1, torch.get_num_threads() // modes[mode]), len(scores[mode]),
             f"{min(seconds[mode]):.0f}", f"{base / min(seconds[mode]):.2f}x"] for mode in modes]
    table = markdown_table(["mode", "runs at a time", "threads each", "runs", "wall s (best round)",
                            "speed vs one at a time"], rows)
    scope = f"limited to {', '.join(args.methods)}" if args.methods else "every configuration"
    table += (f"\nSuite {args.suite}, {scope}; same runs in both modes: {same_runs}; "
              f"largest score difference between the modes: {largest_gap:.4f} (threads change float reductions "
              "in the last bits, which can move a close prediction).\n")
    settings = {"suite": args.suite, "methods": args.methods, "jobs": args.jobs, "rounds": args.rounds,
                "device": "cpu", "wall_seconds": round(time.perf_counter() - start)}
    write_result(args.out, "bench_jobs", settings, {"wall_seconds": seconds, "same_runs": same_runs,
                                                    "largest_score_gap": largest_gap}, table)


if __name__ == "__main__":
    main()
