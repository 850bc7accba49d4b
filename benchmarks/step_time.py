"""Time one training step on the embedded SmolLM2-135M (fp32, all 210 default target matrices) for every method at
rank r, against the frozen floor, and measure each configuration's memory in a process of its own.

    python benchmarks/step_time.py [--r 8] [--batch 4] [--seq 128] [--warmup 3] [--rounds 5] [--steps 2]
                                   [--out benchmarks/results/step_time.json]

A method's step is forward + backward + AdamW step (lr 1e-4, weight decay 0) + zero_grad on one fixed batch of
random token ids with labels = inputs (the model's causal-LM loss). The floor is the model with no adapter and every
parameter frozen, its input embeddings' output made to require grad so that backward still runs through every
activation: forward + backward, no optimizer. The model is loaded once and every configuration trains its own deep
copy of it. After `--warmup` steps of each, the timed steps are interleaved (each of `--rounds` rounds runs `--steps`
steps of every configuration in turn) so that machine drift hits all of them alike; the table gives the median step.

Memory: in-process RSS cannot be attributed to one configuration, so the script runs itself once per configuration
with `--only CONFIG` (load, adapt from the warm factor cache, `--warmup` steps; prints JSON). The peak RSS is the whole
process's (loading included, VmHWM); the growth is the peak during the steps minus the RSS right before the first
step, i.e. adapter + optimizer state + activations. Linux with glibc only: right before the first step, freed heap
memory is given back (malloc_trim) and the peak RSS (VmHWM) is reset through /proc/self/clear_refs.

Writes JSON (settings, versions, git sha, machine, timings, memory) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import svdtune
from svdtune.bench import environment
from svdtune.methods import rank_option
from svdtune.models import load_model

FLOOR = "floor"
CONFIGS = (FLOOR, *svdtune.METHODS)


def make_batch(vocab_size: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def prepare(model: nn.Module, config: str, r: int, cache: str) -> int:
    """Make `model` ready to train as `config`, in place; returns its number of trainable parameters."""
    model.train()
    if config == FLOOR:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_())
        return 0
    svdtune.adapt(model, config, cache=cache, verbose=False, progress=False, **rank_option(config, r))
    return model.svdtune_summary.trainable


def make_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float) -> Callable[[], None]:
    """One training step: forward + backward, then AdamW step + zero_grad when anything is trainable."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return lambda: model(**batch).loss.backward()
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, rounds: int,
                     per_round: int) -> dict[str, list[float]]:
    """Seconds of every timed step, by configuration; round-robin over the configurations in each round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current RSS, VmHWM: peak RSS since the last reset), MB."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    return kb / 1024


def reset_peak_rss() -> None:
    """Give freed heap memory back to the OS (glibc), then reset the peak RSS (VmHWM) to the current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else memory freed while loading hides the steps' own allocations
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0


def measure_memory(config: str, args: argparse.Namespace, cache: str) -> dict:
    """Load, prepare `config`, run `args.warmup` steps; the memory figures of this process, MB."""
    model, _ = load_model("smollm2-135m")
    trainable = prepare(model, config, args.r, cache)
    step = make_step(model, make_batch(model.config.vocab_size, args.batch, args.seq, args.seed), args.lr)
    # VmHWM, not ru_maxrss: ru_maxrss starts from the RSS inherited at fork (here the main process, which holds a
    # model per configuration), and clear_refs does not reset that.
    setup_peak = status_mb("VmHWM")
    reset_peak_rss()
    before = status_mb("VmRSS")
    for _ in range(args.warmup):
        step()
    steps_peak = status_mb("VmHWM")
    return {"peak_rss_mb": round(max(setup_peak, steps_peak), 1), "setup_peak_rss_mb": round(setup_peak, 1),
            "rss_before_steps_mb": round(before, 1), "steps_peak_rss_mb": round(steps_peak, 1),
            "rss_growth_mb": round(steps_peak - before, 1), "trainable": trainable}


def memory_in_subprocess(config: str, args: argparse.Namespace, cache: str) -> dict:
    command = [sys.executable, __file__, "--only", config, "--cache", cache, "--r", str(args.r),
               "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
               "--seed", str(args.seed), "--lr", str(args.lr)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--only {config} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def git(*command: str) -> str:
    try:
        return subprocess.run(["git", *command], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (--only: steps run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration in each round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    parser.add_argument("--only", choices=CONFIGS, help="measure the memory of one configuration, print JSON")
    parser.add_argument("--cache", help="SVD/QR factor cache directory (default: a fresh temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache or temporary
        if args.only:
            print(json.dumps(measure_memory(args.only, args, cache)))
            return
        base, _ = load_model("smollm2-135m")
        batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.seed)
        trainable, steps = {}, {}
        for config in CONFIGS:
            model = copy.deepcopy(base)
            trainable[config] = prepare(model, config, args.r, cache)
            steps[config] = make_step(model, batch, args.lr)
        del base, model
        seconds = time_interleaved(steps, args.warmup, args.rounds, args.steps)
        del steps
        memory = {}
        for config in CONFIGS:
            memory[config] = memory_in_subprocess(config, args, cache)
            print(config, json.dumps(memory[config]), flush=True)

    median = {config: statistics.median(s) for config, s in seconds.items()}
    rows = {config: {"median_s": round(median[config], 4), "min_s": round(min(seconds[config]), 4),
                     "max_s": round(max(seconds[config]), 4), "x_lora": round(median[config] / median["lora"], 3),
                     "x_floor": round(median[config] / median[FLOOR], 3), "trainable": trainable[config],
                     "memory": memory[config], "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in CONFIGS}
    result = {"benchmark": "step_time", "model": "smollm2-135m", "dtype": "float32", "modules": 210, "r": args.r,
              "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "rounds": args.rounds,
              "steps_per_round": args.steps, "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0},
              "seed": args.seed, **environment(),
              "git_dirty": git("status", "--porcelain", "--untracked-files=no") != "", "cpu": cpu_model(),
              "wall_seconds": round(time.perf_counter() - start, 1), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| configuration (r={args.r}, {args.batch}x{args.seq} tokens) | median step s | × lora | × floor "
          "| peak RSS MB | RSS growth during steps MB | trainable params |")
    print("|---|---|---|---|---|---|---|")
    for config, row in rows.items():
        print(f"| {config} | {row['median_s']:.3f} | {row['x_lora']:.2f} | {row['x_floor']:.2f} | "
              f"{row['memory']['peak_rss_mb']:.0f} | {row['memory']['rss_growth_mb']:.0f} | {row['trainable']:,} |")


if __name__ == "__main__":
    main()
