"""Training-step time and peak memory of SVF and SVFT on the embedded SmolLM2-135M (fp32, the 210 default target
matrices), against LoRA r=8, against the official codes' dense rebuild, and against keeping both U and V.

    python benchmarks/svf_svft_step.py [--device cpu|cuda] [--batch 4] [--seq 128] [--rounds 5]
                                       [--configs lora svf ...] [--out benchmarks/results/svf_svft_step.json]

Configurations (every one on the same targets, the same batch, the same AdamW step):

* `lora`: LoRA r=8, the reference.
* `svf`, `svft-plain`, `svft-banded`, `svft-random`, `svft-top_k` (d=2): svdtune as shipped, W kept and the update
  computed from the smaller side of the basis (methods/svf.py, `SpectralAdapter`).
* `svf-two-sided`: y = x Wᵀ + ((x V) ⊙ d) Uᵀ with both U and V held, the obvious factored form.
* `svf-dense`, `svft-banded-dense`: what the official codes do, rebuilding the dense W' = U (diag(S) + Mix) Vᵀ on
  every forward and multiplying by it.

Timing and memory as in step_time.py (harness.py): interleaved medians in one process, memory in a fresh process per
configuration (`--only`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from harness import markdown_table, medians, run_step_benchmark, step_parser, step_settings, write_result
from svdtune.methods.svf import SVF, SpectralAdapter


class BothSides(SpectralAdapter):
    """The two-sided factored forward: y = x Wᵀ + mix(x V) Uᵀ, mix = the update in σ units (SVF: d = S(cz − 1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.spectrum_change() if isinstance(self, SVF) else None
        h = F.linear(x, self.Vh)
        return self.base(x) + F.linear(h * mix if mix is not None else self.mix(h), self.U)


class DenseRebuild(SpectralAdapter):
    """The official codes' forward: W' = U (diag(S) + Mix) Vᵀ built densely on every call, then x W'ᵀ + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.diag(self.spectrum_change()) if isinstance(self, SVF) else self.dense_m()
        weight = self.U @ (torch.diag(self.S) + mix) @ self.Vh
        return F.linear(x, weight, self.base.bias)


def holding(forward: type[SpectralAdapter]) -> Callable[[SpectralAdapter], None]:
    """Switch an adapter to `forward`, holding both sides of its basis (as U and Vh buffers)."""

    def change(adapter: SpectralAdapter) -> None:
        U, _, Vh = adapter.triplets()
        adapter.register_buffer("U", U.contiguous(), persistent=False)
        adapter.register_buffer("Vh", Vh.contiguous(), persistent=False)
        del adapter.basis
        adapter.__class__ = type(f"{forward.__name__}{type(adapter).__name__}", (forward, type(adapter)), {})

    return change


BANDED = {"d": 2}
# name: (method, options, what to do to every adapter after adapting, or None)
CONFIGS: dict[str, tuple[str, dict, Callable[[SpectralAdapter], None] | None]] = {
    "lora": ("lora", {"r": 8}, None),
    "svf": ("svf", {}, None),
    "svft-plain": ("svft", {}, None),
    "svft-banded": ("svft", {"pattern": "banded", **BANDED}, None),
    "svft-random": ("svft", {"pattern": "random", **BANDED}, None),
    "svft-top_k": ("svft", {"pattern": "top_k", **BANDED}, None),
    "svf-two-sided": ("svf", {}, holding(BothSides)),
    "svf-dense": ("svf", {}, holding(DenseRebuild)),
    "svft-banded-dense": ("svft", {"pattern": "banded", **BANDED}, holding(DenseRebuild)),
}


def prepare(model: nn.Module, config: str, cache: str) -> tuple[nn.Module, int]:
    """Adapt `model` as `config`, in place; (model, its number of trainable parameters)."""
    method, options, change = CONFIGS[config]
    model.train()
    svdtune.adapt(model, method, cache=cache, verbose=False, progress=False, **options)
    if change is not None:
        for adapter in svdtune.adapters(model).values():
            change(adapter)
    return model, model.svdtune_summary.trainable


def main() -> None:
    parser = step_parser(__doc__, warmup=2, rounds=3, out="benchmarks/results/svf_svft_step.json")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to run (lora is always run)")
    args = parser.parse_args()
    start = time.perf_counter()
    configs = ["lora", *(c for c in args.configs if c != "lora")]
    measured = run_step_benchmark(__file__, args, configs, prepare)
    if measured is None:
        return
    trainable, seconds, memory = measured
    median = medians(seconds)
    lora_peak, lora_growth = memory["lora"]["peak_mb"], memory["lora"]["growth_mb"]
    rows = {config: {"method": CONFIGS[config][0], "options": CONFIGS[config][1], "median_s": round(median[config], 4),
                     "x_lora_time": round(median[config] / median["lora"], 3),
                     "x_lora_peak": round(memory[config]["peak_mb"] / lora_peak, 3),
                     "x_lora_growth": round(memory[config]["growth_mb"] / lora_growth, 3),
                     "trainable": trainable[config], "memory": memory[config],
                     "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in configs}
    header = ["configuration", "median step s", "× lora time", "peak MB", "× lora peak", "growth MB",
              "× lora growth", "trainable"]
    table = markdown_table(header, [[c, f"{r['median_s']:.3f}", f"{r['x_lora_time']:.2f}",
                                     f"{r['memory']['peak_mb']:.0f}", f"{r['x_lora_peak']:.2f}",
                                     f"{r['memory']['growth_mb']:.0f}", f"{r['x_lora_growth']:.2f}",
                                     f"{r['trainable']:,}"] for c, r in rows.items()])
    settings = {**step_settings(args), "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "svf_svft_step", settings, rows, table)


if __name__ == "__main__":
    main()
