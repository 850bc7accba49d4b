"""Inference speed on the embedded SmolLM2-135M: the untouched base model vs an adapted model unmerged (the adapter
runs next to the frozen weight) vs the same model merged (`svdtune.merge`: plain linear layers again), and PEFT's
LoRA unmerged and merged in the same run, for a forward pass (prefill) and for greedy generation.

    python benchmarks/inference.py [--device cpu|cuda] [--dtype float32|bfloat16] [--method lora] [--r 8]
                                   [--batch 4] [--seq 128] [--new-tokens 32] [--rounds 5]
                                   [--out benchmarks/results/inference.json]

With `--dtype bfloat16` the base is bf16 and the adapters float32 (svdtune's and PEFT's defaults on a bf16
base); merging folds them into the bf16 weights. The adapter's factors are randomised first (as after training), so
the merge changes the weights. Timings are interleaved, median per configuration; tokens/s counts the tokens
processed (forward) or generated (generation).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from harness import (
    ALLOCATOR_SETTING,
    DTYPES,
    products_setting,
    make_batch,
    markdown_table,
    medians,
    peft_model,
    synchronized,
    time_interleaved,
    write_result,
)

import svdtune
from svdtune.allocator import keep_freed_memory
from svdtune.data.models import load_model
from svdtune.methods import rank_option


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Give every trainable tensor a small random change, so the adapter is not a no-op."""
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator).to(parameter))


def configurations(base: torch.nn.Module, method: str, r: int) -> dict[str, torch.nn.Module]:
    ours = copy.deepcopy(base)
    svdtune.adapt(ours, method, verbose=False, progress=False, **rank_option(method, r))
    randomize(ours)
    merged = svdtune.merge(copy.deepcopy(ours))
    theirs = peft_model(copy.deepcopy(base), "lora", r)
    randomize(theirs)
    theirs_merged = copy.deepcopy(theirs).merge_and_unload()
    models = {"base": base, f"svdtune {method} unmerged": ours, f"svdtune {method} merged": merged,
              "peft lora unmerged": theirs, "peft lora merged": theirs_merged}
    for model in models.values():
        model.eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the base model's weights")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()
    start = time.perf_counter()
    keep_freed_memory()
    base, _ = load_model("smollm2-135m")
    base.to(args.device, DTYPES[args.dtype])
    models = configurations(base, args.method, args.r)
    batch = make_batch(base.config.vocab_size, args.batch, args.seq, 0, args.device)
    prompt = batch["input_ids"][:1, :16]

    def forward(model: torch.nn.Module):  # noqa: ANN202
        @torch.no_grad()
        def run() -> None:
            with svdtune.bf16_products(model):  # a bf16 base on a CPU without bf16 units: float32 products
                model(input_ids=batch["input_ids"])
        return run

    def generate(model: torch.nn.Module):  # noqa: ANN202
        def run() -> None:
            with svdtune.bf16_products(model):
                model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False)
        return run

    timings = {}
    for kind, make, tokens in (("forward", forward, args.batch * args.seq), ("generate", generate, args.new_tokens)):
        steps = {name: synchronized(make(model), args.device) for name, model in models.items()}
        median = medians(time_interleaved(steps, args.warmup, args.rounds, 1))
        timings[kind] = {name: {"median_s": round(s, 4), "tokens_per_s": round(tokens / s, 1),
                                "x_base": round(s / median["base"], 3)} for name, s in median.items()}
    rows = [[name, timings["forward"][name]["tokens_per_s"], timings["forward"][name]["x_base"],
             timings["generate"][name]["tokens_per_s"], timings["generate"][name]["x_base"]] for name in models]
    table = markdown_table(["model", f"forward tokens/s ({args.batch}x{args.seq})", "forward time × base",
                            f"generate tokens/s (1 x {args.new_tokens} new)", "generate time × base"], rows)
    settings = {"model": "smollm2-135m", "dtype": args.dtype, "device": args.device, "method": args.method,
                "r": args.r, "batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens,
                "rounds": args.rounds, "allocator": ALLOCATOR_SETTING,
                "bf16_products": products_setting(args.dtype, args.device),
                "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "inference", settings, timings, table)


if __name__ == "__main__":
    main()
