"""Where unmerged generation's overhead goes: one-sequence greedy generation on the embedded SmolLM2-135M (float32),
the base model vs svdtune's LoRA unmerged vs the same adapted model with its rank-r path skipped (every adapter call
still made, with all its Python, but computing only the base product). The last one isolates the cost of 210 adapter
calls per token from the cost of their two small products. With `--compile`, the base and the adapted model each
generate through `torch.compile` (inductor, a static KV cache), without the Python between products; the skipped
path is left out there (the compiled graph would keep whichever product it was traced with).

    python benchmarks/generation_overhead.py [--r 8] [--new-tokens 32] [--rounds 9] [--compile]
                                             [--out benchmarks/results/generation_overhead.json]

Same model, prompt and settings as `inference.py`; timings interleaved, medians.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import ALLOCATOR_SETTING, make_batch, markdown_table, medians, time_interleaved, write_result
from inference import randomize

import svdtune
import svdtune.fused
from svdtune.allocator import keep_freed_memory
from svdtune.data.models import load_model


def base_product_only(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, scale: float) -> tuple[torch.Tensor, None]:
    """`fused.fused_product` without its rank-r path: the adapter's calls and checks stay, its products go."""
    return F.linear(x, weight, bias), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--compile", action="store_true", help="generate through torch.compile, static cache")
    parser.add_argument("--out", default="benchmarks/results/generation_overhead.json")
    args = parser.parse_args()
    start = time.perf_counter()
    keep_freed_memory()
    base, _ = load_model("smollm2-135m")
    adapted = copy.deepcopy(base)
    svdtune.adapt(adapted, "lora", r=args.r, verbose=False, progress=False)
    randomize(adapted)
    base.eval(), adapted.eval()
    prompt = make_batch(base.config.vocab_size, 1, 16, 0, "cpu")["input_ids"]
    full_product = svdtune.fused.fused_product
    options = {"cache_implementation": "static"} if args.compile else {}
    if args.compile:
        for model in (base, adapted):
            model.forward = torch.compile(model.forward, dynamic=False)

    def generate(model: torch.nn.Module, product: Callable) -> Callable[[], None]:
        def run() -> None:
            svdtune.fused.fused_product = product
            try:
                model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, **options)
            finally:
                svdtune.fused.fused_product = full_product
        return run

    steps = {"base": generate(base, full_product), "lora unmerged": generate(adapted, full_product)}
    if not args.compile:
        steps["lora unmerged, rank-r path skipped"] = generate(adapted, base_product_only)
    median = medians(time_interleaved(steps, args.warmup, args.rounds, 1))
    rows = {name: {"ms_per_token": round(1000 * s / args.new_tokens, 2), "x_base": round(s / median["base"], 3)}
            for name, s in median.items()}
    table = markdown_table([f"model (1 sequence, float32{', compiled' if args.compile else ''})", "ms per new token",
                            "time × base"],
                           [[name, r["ms_per_token"], r["x_base"]] for name, r in rows.items()])
    settings = {"model": "smollm2-135m", "dtype": "float32", "device": "cpu", "method": "lora", "r": args.r,
                "new_tokens": args.new_tokens, "rounds": args.rounds, "compiled": args.compile,
                "allocator": ALLOCATOR_SETTING,
                "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "generation_overhead", settings, rows, table)


if __name__ == "__main__":
    main()
