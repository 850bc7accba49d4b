"""Training-step time and memory of SVF and SVFT on the embedded SmolLM2-135M (fp32, the 210 default target
matrices), against LoRA r=8, against the official codes' dense rebuild, and against other ways to hold U and V.

    python benchmarks/svf_svft_step.py [--batch 4] [--seq 128] [--warmup 2] [--rounds 3] [--steps 2]
                                       [--configs lora,svf,...] [--out benchmarks/results/svf_svft_step.json]

Configurations (every one on the same targets, the same batch, the same AdamW step):

* `lora`: LoRA r=8, the reference.
* `svf`, `svft-plain`, `svft-banded`, `svft-random`, `svft-top_k` (d=2): svdtune as shipped, W kept and the update
  computed factored, y = x Wᵀ + mix(x V) Uᵀ, U and V in the weight's dtype.
* `svf-dense`, `svft-plain-dense`, `svft-banded-dense`: what the official codes do, rebuilding the dense
  W' = U (diag(S) + Mix) Vᵀ on every forward and multiplying by it.
* `svf-replace`: W replaced by its factors, y = ((x V) ⊙ S z) Uᵀ + b, with W freed (possible only because p = min(m,
  n); not an svdtune option, since the frozen base would no longer be the user's weight: `unload` could not be
  exact and the output at init would differ from the base by the SVD's rounding).
* `svf-bf16-basis`: as `svf`, with U and V held and multiplied in bfloat16 (the base path stays fp32).

Step = forward + backward + AdamW step + zero_grad on one fixed batch of random tokens (labels = inputs), timed
interleaved over rounds as in benchmarks/step_time.py, whose helpers this script reuses. Memory is measured in a
process per configuration (`--only`): peak RSS of the whole process, and its growth during the steps (activations,
gradients, optimizer state) over the RSS after adapting. Writes JSON with every step time and ratios to LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune.bench import environment
from svdtune.methods.svf import SVF, SpectralAdapter
from svdtune.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_model, make_batch, make_step, reset_peak_rss, status_mb, time_interleaved  # noqa: E402


class DenseRebuild(SpectralAdapter):
    """The official codes' forward: W' = U (diag(S) + Mix) Vᵀ built densely on every call, then x W'ᵀ + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.diag(self.spectrum_change()) if isinstance(self, SVF) else self.dense_m()
        weight = self.U @ (torch.diag(self.S) + mix) @ self.Vh
        return F.linear(x, weight, self.base.bias)


class ReplaceBase(SVF):
    """W replaced by its factors: y = ((x V) ⊙ S c z) Uᵀ + b; the frozen W itself is freed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Vh) * (self.S * self.scales()), self.U, self.base.bias)


def dense_rebuild(adapter: SpectralAdapter) -> None:
    adapter.__class__ = type(f"Dense{type(adapter).__name__}", (DenseRebuild, type(adapter)), {})


def replace_base(adapter: SpectralAdapter) -> None:
    adapter.__class__ = ReplaceBase
    adapter.base.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def bf16_basis(adapter: SpectralAdapter) -> None:
    adapter.U, adapter.Vh = adapter.U.bfloat16(), adapter.Vh.bfloat16()


BANDED = {"d": 2}
# name: (method, options, what to do to every adapter after adapting, or None)
CONFIGS: dict[str, tuple[str, dict, Callable[[SpectralAdapter], None] | None]] = {
    "lora": ("lora", {"r": 8}, None),
    "svf": ("svf", {}, None),
    "svft-plain": ("svft", {}, None),
    "svft-banded": ("svft", {"pattern": "banded", **BANDED}, None),
    "svft-random": ("svft", {"pattern": "random", **BANDED}, None),
    "svft-top_k": ("svft", {"pattern": "top_k", **BANDED}, None),
    "svf-dense": ("svf", {}, dense_rebuild),
    "svft-plain-dense": ("svft", {}, dense_rebuild),
    "svft-banded-dense": ("svft", {"pattern": "banded", **BANDED}, dense_rebuild),
    "svf-replace": ("svf", {}, replace_base),
    "svf-bf16-basis": ("svf", {}, bf16_basis),
}


def prepare(model: nn.Module, config: str, cache: str) -> int:
    """Adapt `model` as `config`, in place; returns its number of trainable parameters."""
    method, options, change = CONFIGS[config]
    model.train()
    svdtune.adapt(model, method, cache=cache, verbose=False, progress=False, **options)
    if change is not None:
        for adapter in svdtune.adapters(model).values():
            change(adapter)
    return model.svdtune_summary.trainable


def measure_memory(config: str, args: argparse.Namespace, cache: str) -> dict:
    """Load, adapt as `config`, run `args.warmup` steps in this process; its memory figures, MB."""
    model, _ = load_model("smollm2-135m")
    prepare(model, config, cache)
    step = make_step(model, make_batch(model.config.vocab_size, args.batch, args.seq, args.seed), args.lr)
    reset_peak_rss()
    before = status_mb("VmRSS")
    for _ in range(args.warmup):
        step()
    peak = status_mb("VmHWM")
    return {"rss_after_adapt_mb": round(before, 1), "steps_peak_rss_mb": round(peak, 1),
            "rss_growth_mb": round(peak - before, 1)}


def memory_in_subprocess(config: str, args: argparse.Namespace, cache: str) -> dict:
    command = [sys.executable, __file__, "--only", config, "--cache", cache, "--batch", str(args.batch),
               "--seq", str(args.seq), "--warmup", str(args.warmup), "--seed", str(args.seed), "--lr", str(args.lr)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--only {config} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (--only: steps run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration in each round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset (lora is always run)")
    parser.add_argument("--out", default="benchmarks/results/svf_svft_step.json")
    parser.add_argument("--only", choices=list(CONFIGS), help="measure the memory of one configuration, print JSON")
    parser.add_argument("--cache", help="SVD factor cache directory (default: a fresh temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    configs = ["lora", *(c for c in args.configs.split(",") if c != "lora")]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache or temporary
        if args.only:
            print(json.dumps(measure_memory(args.only, args, cache)))
            return
        base, _ = load_model("smollm2-135m")
        batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.seed)
        trainable, steps = {}, {}
        for config in configs:
            model = copy.deepcopy(base)
            trainable[config] = prepare(model, config, cache)
            steps[config] = make_step(model, batch, args.lr)
        del base, model
        seconds = time_interleaved(steps, args.warmup, args.rounds, args.steps)
        del steps
        lora_median = statistics.median(seconds["lora"])
        for config, s in seconds.items():  # the timings now, in case the memory runs are cut short
            print(f"{config}: median step {statistics.median(s):.3f} s, {statistics.median(s) / lora_median:.2f}x lora",
                  flush=True)
        memory = {}
        for config in configs:
            memory[config] = memory_in_subprocess(config, args, cache)
            print(config, json.dumps(memory[config]), flush=True)

    median = {config: statistics.median(s) for config, s in seconds.items()}
    lora_peak, lora_growth = memory["lora"]["steps_peak_rss_mb"], memory["lora"]["rss_growth_mb"]
    rows = {config: {"method": CONFIGS[config][0], "options": CONFIGS[config][1], "median_s": round(median[config], 4),
                     "x_lora_time": round(median[config] / median["lora"], 3),
                     "x_lora_peak_rss": round(memory[config]["steps_peak_rss_mb"] / lora_peak, 3),
                     "x_lora_rss_growth": round(memory[config]["rss_growth_mb"] / lora_growth, 3),
                     "trainable": trainable[config], "memory": memory[config],
                     "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in configs}
    result = {"benchmark": "svf_svft_step", "model": "smollm2-135m", "dtype": "float32", "modules": 210,
              "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "rounds": args.rounds,
              "steps_per_round": args.steps, "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0},
              "seed": args.seed, **environment(), "cpu": cpu_model(),
              "wall_seconds": round(time.perf_counter() - start, 1), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| configuration ({args.batch}x{args.seq} tokens) | median step s | × lora time | peak RSS MB "
          "| × lora peak | RSS growth MB | × lora growth | trainable |")
    print("|---|---|---|---|---|---|---|---|")
    for config, row in rows.items():
        mem = row["memory"]
        print(f"| {config} | {row['median_s']:.3f} | {row['x_lora_time']:.2f} | {mem['steps_peak_rss_mb']:.0f} | "
              f"{row['x_lora_peak_rss']:.2f} | {mem['rss_growth_mb']:.0f} | {row['x_lora_rss_growth']:.2f} | "
              f"{row['trainable']:,} |")


if __name__ == "__main__":
    main()
