"""Time `svdtune.adapt` on the embedded SmolLM2-135M (all 210 default target matrices) for every method:
without the factor cache, with it cold (the first run fills it), and warm (the second run reads it).
Cold includes hashing the weights and writing the factors; warm is hashing plus reading them.

    python benchmarks/adapt_time.py [--r 8] [--out benchmarks/results/adapt_time.json]

Writes JSON (settings, versions, git sha, machine, timings) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import svdtune
from svdtune.bench import environment
from svdtune.methods import rank_option
from svdtune.models import load_model


# Every registered method with its defaults, plus PiSSA's randomized SVD at PEFT's two usual iteration counts.
VARIANTS: dict[str, tuple[str, dict]] = {name: (name, {}) for name in svdtune.METHODS}
VARIANTS.update({"pissa niter=4": ("pissa", {"niter": 4}), "pissa niter=16": ("pissa", {"niter": 16})})


def timed_adapt(model: torch.nn.Module, method: str, options: dict, r: int, cache: bool | str) -> dict:
    start = time.perf_counter()
    svdtune.adapt(model, method, cache=cache, verbose=False, progress=False, **rank_option(method, r), **options)
    seconds = time.perf_counter() - start
    summary = model.svdtune_summary
    svdtune.unload(model)
    return {"seconds": round(seconds, 3), "factor_seconds": round(summary.factor_seconds, 3),
            "cache_hits": summary.cache_hits, "trainable": summary.trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/adapt_time.json")
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m")
    rows = {}
    for label, (method, options) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as cache:
            rows[label] = {"no_cache": timed_adapt(model, method, options, args.r, False),
                           "cold": timed_adapt(model, method, options, args.r, cache),
                           "warm": timed_adapt(model, method, options, args.r, cache)}
        print(label, json.dumps(rows[label]), flush=True)
    result = {"benchmark": "adapt_time", "model": "smollm2-135m", "r": args.r, "modules": 210, **environment(),
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| method (r={args.r}, 210 matrices) | no cache, s | cold cache, s | warm cache, s "
          "| of which SVD/QR (warm), s |")
    print("|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method} | {row['no_cache']['seconds']:.2f} | {row['cold']['seconds']:.2f} | "
              f"{row['warm']['seconds']:.2f} | {row['warm']['factor_seconds']:.2f} |")


if __name__ == "__main__":
    main()
