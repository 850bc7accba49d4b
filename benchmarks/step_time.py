"""Training step time and peak memory on the embedded SmolLM2-135M (fp32, the 210 q/k/v/o/gate/up/down matrices),
svdtune side by side with Hugging Face PEFT in the same run, against the frozen floor.

    python benchmarks/step_time.py [--device cpu|cuda] [--r 8] [--batch 4] [--seq 128] [--rounds 5]
                                   [--configs floor lora peft:lora ...] [--out benchmarks/results/step_time.json]

Configurations (see harness.py): the floor (no adapter, backward through every activation), every registered svdtune
method at rank r, and PEFT's LoRA with its default, PiSSA (randomized, 4 iterations: the init does not change the
step) and OLoRA inits, and PEFT's AdaLoRA (with its per-step rank allocation). A step is forward + backward + AdamW
+ zero_grad on one fixed batch of random token ids (labels = inputs). The model is loaded once and each configuration
trains its own deep copy; after `--warmup` steps each, timed steps are interleaved, `--steps` per configuration per
round, and the table gives medians and ratios. Memory is measured in a fresh process per configuration (`--only`):
the peak during `--warmup` steps (RSS on CPU, allocator peak on CUDA) and its growth over the model at rest, i.e.
adapter + optimizer state + activations.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

import svdtune
from harness import (FLOOR, make_batch, make_step, markdown_table, medians, prepare, run_isolated, step_memory,
                     synchronized, time_interleaved, write_result)
from svdtune.models import load_model

PEFT_CONFIGS = ("peft:lora", "peft:pissa_niter_4", "peft:olora", "peft:adalora")
# The pairs the targets compare: svdtune's method vs PEFT's implementation of the same method.
COUNTERPARTS = {"lora": "peft:lora", "pissa": "peft:pissa_niter_4", "olora": "peft:olora", "adalora": "peft:adalora"}


def default_configs() -> tuple[str, ...]:
    return (FLOOR, *svdtune.METHODS, *PEFT_CONFIGS)


def load(device: str) -> torch.nn.Module:
    model, _ = load_model("smollm2-135m")
    return model.to(device)


def measure_memory(args: argparse.Namespace, cache: str) -> dict:
    """This process: load, prepare `args.only`, run `args.warmup` steps; memory figures, MB."""
    model, trainable = prepare(load(args.device), args.only, args.r, cache)
    return {**step_memory(model, args), "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration in each round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=default_configs())
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one configuration's memory
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache or temporary
        if args.only:
            print(json.dumps(measure_memory(args, cache)))
            return
        base = load(args.device)
        batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.seed, args.device)
        trainable, steps = {}, {}
        for config in args.configs:
            model, trainable[config] = prepare(copy.deepcopy(base), config, args.r, cache)
            steps[config] = synchronized(make_step(model, batch, args.lr), args.device)
        del base, model
        seconds = time_interleaved(steps, args.warmup, args.rounds, args.steps)
        del steps
        memory = {}
        for config in args.configs:
            options = ["--only", config, "--cache", cache, "--device", args.device, "--r", str(args.r), "--batch",
                       str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--seed",
                       str(args.seed), "--lr", str(args.lr)]
            memory[config] = run_isolated(__file__, options)
            print(config, json.dumps(memory[config]), flush=True)

    median = medians(seconds)

    def ratio(a: str, b: str, table: dict) -> float | None:
        return round(table[a] / table[b], 3) if a in table and b in table else None

    peaks = {config: memory[config]["peak_mb"] for config in memory}
    rows = {config: {"median_s": round(median[config], 4), "x_lora": ratio(config, "lora", median),
                     "x_floor": ratio(config, FLOOR, median), "x_peft_lora": ratio(config, "peft:lora", median),
                     "peak_x_peft_lora": ratio(config, "peft:lora", peaks), "trainable": trainable[config],
                     "memory": memory[config], "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in args.configs}
    versus = {f"{ours} / {theirs}": {"step": ratio(ours, theirs, median), "peak_memory": ratio(ours, theirs, peaks)}
              for ours, theirs in COUNTERPARTS.items() if ours in median and theirs in median}
    header = ["configuration", "median step s", "× floor", "× svdtune lora", "× PEFT lora", "peak MB",
              "peak × PEFT lora", "growth MB", "trainable"]
    table = markdown_table(header, [[c, f"{r['median_s']:.3f}", r["x_floor"], r["x_lora"], r["x_peft_lora"],
                                     f"{r['memory']['peak_mb']:.0f}", r["peak_x_peft_lora"],
                                     f"{r['memory']['growth_mb']:.0f}", f"{r['trainable']:,}"]
                                    for c, r in rows.items()])
    table = markdown_table(["svdtune / PEFT, same method", "step time", "peak memory"],
                           [[pair, v["step"], v["peak_memory"]] for pair, v in versus.items()]) + "\n" + table
    settings = {"model": "smollm2-135m", "dtype": "float32", "device": args.device, "r": args.r,
                "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "rounds": args.rounds,
                "steps_per_round": args.steps, "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0},
                "seed": args.seed, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "step_time", settings, {"versus_peft": versus, "configs": rows}, table)


if __name__ == "__main__":
    main()
