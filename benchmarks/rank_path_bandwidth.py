"""Why LoRA's step stays above the frozen floor: the rank-r products of the fused path (`svdtune.fused`) timed one by
one at the shapes of SmolLM2-135M's 210 target matrices, each with the memory bandwidth it reaches on its full-size
operand, next to this machine's copy bandwidth for a tensor of the same size.

    python benchmarks/rank_path_bandwidth.py [--dtype float32|bfloat16] [--tokens 512] [--r 8] [--reps 30] [--cold]
                                             [--out benchmarks/results/rank_path_bandwidth.json]

Each product has one operand of n x d or n x o elements (n tokens, d inputs, o outputs) and one only r wide, so it
does ~2r FLOPs per element it reads: far too few to be limited by arithmetic. It reads (and, for the two in-place
accumulations, writes back) that full-size operand once, which is the least any kernel outside the base product
can do. An op near 1.0x the copy bandwidth (an in-place accumulation can pass it: it reads and writes one tensor
where a copy touches two) is as fast as a separate op can be; below the sum of such ops only a kernel that runs the
rank-r path inside the base product, on tiles of x, g and the output still in registers, can go.
The base products of the same step (x Wᵀ forward, g W backward) are timed alike for scale. Medians of `--reps`.
With `--cold` every timed call starts with its operands out of the caches (a buffer larger than the last-level
cache is written first, untimed), as in a model's step, where the backward pass finds x long evicted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from harness import DTYPES, LLAMA_TARGETS, load_smollm2, markdown_table, products_setting, write_result

from svdtune.fused import times_factor

# One step's rank-r work per adapted layer, as `fused._LowRankLinear` runs it: (what it computes, its full-size
# operand: "x" n x d or "g" n x o, read once and written back too if it accumulates in place).
RANK_OPS: dict[str, tuple[str, bool]] = {
    "forward: h = x Aᵀ": ("x", False),
    "forward: out += h Bᵀ": ("g", True),
    "backward: g B": ("g", False),
    "backward: B's gradient hᵀ g": ("g", False),
    "backward: A's gradient ghᵀ x": ("x", False),
    "backward: grad_x += gh A": ("x", True),
}


def median_seconds(op: Callable[[], object], reps: int, evict: Callable[[], object]) -> float:
    for _ in range(3):
        op()
    times = []
    for _ in range(reps):
        evict()
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cache_evictor(megabytes: int) -> Callable[[], object]:
    """A call that writes `megabytes` of memory, pushing every operand out of the caches."""
    buffer = torch.zeros(megabytes * 2**18)  # float32: 4 bytes an element
    return lambda: buffer.add_(1.0)


def time_shape(n: int, d: int, o: int, r: int, dtype: torch.dtype, reps: int,
               evict: Callable[[], object]) -> dict[str, float]:
    """Seconds of each rank-r op, of the two base products and of a copy of each full-size operand."""
    x, g, out, grad_x = (torch.randn(rows, cols).to(dtype) for rows, cols in ((n, d), (n, o), (n, o), (n, d)))
    W, A, B, h = (torch.randn(rows, cols).to(dtype) for rows, cols in ((o, d), (r, d), (o, r), (n, r)))
    ops = {
        "forward: h = x Aᵀ": lambda: x @ A.T,
        "forward: out += h Bᵀ": lambda: out.addmm_(h, B.T),
        "backward: g B": lambda: times_factor(g, B),
        "backward: B's gradient hᵀ g": lambda: h.T @ g,
        "backward: A's gradient ghᵀ x": lambda: h.T @ x,
        "backward: grad_x += gh A": lambda: grad_x.addmm_(h, A),
        "base: x Wᵀ": lambda: x @ W.T,
        "base: g W": lambda: g @ W,
        "copy x": lambda: grad_x.copy_(x),
        "copy g": lambda: out.copy_(g),
    }
    return {name: median_seconds(op, reps, evict) for name, op in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=512, help="rows per step (batch x sequence length)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--cold", action="store_true", help="operands out of the caches at every timed call")
    parser.add_argument("--evict-mb", type=int, default=1024, help="with --cold: MB written to evict the caches")
    parser.add_argument("--out", default="benchmarks/results/rank_path_bandwidth.json")
    args = parser.parse_args()
    start = time.perf_counter()
    dtype, n = DTYPES[args.dtype], args.tokens
    model = load_smollm2("cpu")
    shapes = Counter((m.in_features, m.out_features) for name, m in model.named_modules()
                     if name.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    del model
    itemsize = torch.empty(0, dtype=dtype).element_size()
    evict = cache_evictor(args.evict_mb) if args.cold else (lambda: None)
    seconds: Counter[str] = Counter()
    moved: Counter[str] = Counter()
    for (d, o), count in shapes.items():
        timed = time_shape(n, d, o, args.r, dtype, args.reps, evict)
        size = {"x": n * d * itemsize, "g": n * o * itemsize}
        for name, (operand, accumulates) in RANK_OPS.items():
            seconds[name] += count * timed[name]
            moved[name] += count * size[operand] * (2 if accumulates else 1)
            seconds[f"copy for {name}"] += count * timed[f"copy {operand}"] * (1 if accumulates else 0.5)
        for name in ("base: x Wᵀ", "base: g W"):
            seconds[name] += count * timed[name]
    rows = {}
    for name in RANK_OPS:
        bandwidth = moved[name] / seconds[name] / 1e9
        copy_bandwidth = moved[name] / seconds[f"copy for {name}"] / 1e9
        rows[name] = {"ms_per_step": round(1000 * seconds[name], 2), "mb_per_step": round(moved[name] / 2**20, 1),
                      "gb_per_s": round(bandwidth, 1), "x_copy_bandwidth": round(bandwidth / copy_bandwidth, 2)}
    rank_ms = sum(seconds[name] for name in RANK_OPS) * 1000
    base_ms = (seconds["base: x Wᵀ"] + seconds["base: g W"]) * 1000
    copy_ms = sum(seconds[f"copy for {name}"] for name in RANK_OPS) * 1000
    rows["all rank-r ops"] = {"ms_per_step": round(rank_ms, 2), "mb_per_step": round(sum(moved.values()) / 2**20, 1),
                              "gb_per_s": None, "x_copy_bandwidth": round(copy_ms / rank_ms, 2)}
    rows["base products (x Wᵀ, g W)"] = {"ms_per_step": round(base_ms, 2), "mb_per_step": None, "gb_per_s": None,
                                         "x_copy_bandwidth": None}
    caches = ", operands cold" if args.cold else ""
    table = markdown_table([f"op ({args.dtype}, {n} tokens, r={args.r}, {sum(shapes.values())} matrices{caches})",
                            "ms per step", "MB moved", "GB/s", "× copy bandwidth"],
                           [[name, r["ms_per_step"], r["mb_per_step"], r["gb_per_s"], r["x_copy_bandwidth"]]
                            for name, r in rows.items()])
    table += (f"\nThe rank-r ops take {rank_ms / base_ms:.3f}x the time of the base products they sit beside; copying "
              f"their full-size operands alone would take {copy_ms / base_ms:.3f}x.\n")
    settings = {"model": "smollm2-135m", "dtype": args.dtype, "device": "cpu", "tokens": n, "r": args.r,
                "reps": args.reps, "cold": args.cold, "bf16_products": products_setting(args.dtype, "cpu"),
                "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "rank_path_bandwidth", settings, rows, table)


if __name__ == "__main__":
    main()
