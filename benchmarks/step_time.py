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
adapter + optimizer state + activations. "FLOPs × floor" counts each configuration's matrix-product FLOPs of one
forward + backward (`harness.step_flops`) against the floor's; "× own FLOP floor" is its time ratio over that FLOP
ratio, so 1.0 means a method as fast as its own arithmetic allows (SVF's and SVFT's full-rank paths do more
arithmetic than LoRA's, and that column separates their cost from their overhead).
With `--dtype bfloat16` on a CPU without bf16 matrix units every configuration's products run through
`svdtune.bf16_products` (recorded in the settings).
"""

from __future__ import annotations

import time

from harness import (
    FLOOR,
    markdown_table,
    medians,
    prepare,
    run_step_benchmark,
    step_parser,
    step_settings,
    write_result,
)

import svdtune

PEFT_CONFIGS = ("peft:lora", "peft:pissa_niter_4", "peft:olora", "peft:adalora")
# The pairs the targets compare: svdtune's method vs PEFT's implementation of the same method.
COUNTERPARTS = {"lora": "peft:lora", "pissa": "peft:pissa_niter_4", "olora": "peft:olora", "adalora": "peft:adalora"}


def default_configs() -> tuple[str, ...]:
    return (FLOOR, *svdtune.METHODS, *PEFT_CONFIGS)


def main() -> None:
    parser = step_parser(__doc__, warmup=3, rounds=5, out="benchmarks/results/step_time.json")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=default_configs())
    args = parser.parse_args()
    start = time.perf_counter()
    measured = run_step_benchmark(__file__, args, args.configs,
                                  lambda model, config, cache: prepare(model, config, args.r, cache),
                                  forwarded=["--r", str(args.r)])
    if measured is None:
        return
    trainable, seconds, memory, flops = measured
    median = medians(seconds)

    def ratio(a: str, b: str, table: dict) -> float | None:
        return round(table[a] / table[b], 3) if a in table and b in table else None

    peaks = {config: memory[config]["peak_mb"] for config in memory}

    def own_floor(config: str) -> float | None:
        """Time over the floor's, per FLOP over the floor's: 1.0 is a configuration as fast as its arithmetic."""
        if FLOOR not in median:
            return None
        return round((median[config] / median[FLOOR]) / (flops[config] / flops[FLOOR]), 3)

    rows = {config: {"median_s": round(median[config], 4), "x_lora": ratio(config, "lora", median),
                     "x_floor": ratio(config, FLOOR, median), "x_peft_lora": ratio(config, "peft:lora", median),
                     "peak_x_peft_lora": ratio(config, "peft:lora", peaks), "trainable": trainable[config],
                     "flops": flops[config], "flops_x_floor": ratio(config, FLOOR, flops),
                     "x_own_flop_floor": own_floor(config),
                     "memory": memory[config], "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in args.configs}
    versus = {f"{ours} / {theirs}": {"step": ratio(ours, theirs, median), "peak_memory": ratio(ours, theirs, peaks)}
              for ours, theirs in COUNTERPARTS.items() if ours in median and theirs in median}
    header = ["configuration", "median step s", "× floor", "FLOPs × floor", "× own FLOP floor", "× svdtune lora",
              "× PEFT lora", "peak MB", "peak × PEFT lora", "growth MB", "trainable"]
    table = markdown_table(header, [[c, f"{r['median_s']:.3f}", r["x_floor"], r["flops_x_floor"],
                                     r["x_own_flop_floor"], r["x_lora"], r["x_peft_lora"],
                                     f"{r['memory']['peak_mb']:.0f}", r["peak_x_peft_lora"],
                                     f"{r['memory']['growth_mb']:.0f}", f"{r['trainable']:,}"]
                                    for c, r in rows.items()])
    table = markdown_table(["svdtune / PEFT, same method", "step time", "peak memory"],
                           [[pair, v["step"], v["peak_memory"]] for pair, v in versus.items()]) + "\n" + table
    settings = {**step_settings(args), "r": args.r, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "step_time", settings, {"versus_peft": versus, "configs": rows}, table)


if __name__ == "__main__":
    main()
