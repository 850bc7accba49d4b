"""Training-step time and peak memory of SVF and SVFT on the embedded SmolLM2-135M (the 210 default target
matrices), against LoRA r=8, against the official codes' dense rebuild, and against keeping both U and V; on a
bfloat16 base also the relative error of each update.

    python benchmarks/svf_svft_step.py [--device cpu|cuda] [--dtype float32|bfloat16] [--batch 4] [--seq 128]
                                       [--rounds 5] [--configs lora svf ...] [--out benchmarks/results/svf_svft_step.json]

Configurations (every one on the same targets, the same batch, the same AdamW step):

* `lora`: LoRA r=8, the reference.
* `svf`, `svft-plain`, `svft-banded`, `svft-random`, `svft-top_k` (d=2): svdtune as shipped, W kept and the update
  computed from the smaller side of the basis (methods/svf.py, `SpectralAdapter`).
* `svf-two-sided`: y = x Wᵀ + ((x V) ⊙ d) Uᵀ with both U and V held, the obvious factored form.
* `svf-dense`, `svft-plain-dense`, `svft-banded-dense`: what the official codes do, rebuilding the dense
  W' = U (diag(S) + Mix) Vᵀ on every forward (in float32, cast to the base's dtype) and multiplying by it.
* `svft-plain-one-sided`, `svft-banded-one-sided`: SVFT as it was before it held both sides on 16-bit bases (the
  one-sided basis in float32 and Σ⁻¹ cut at p_max·eps·σ_1), for comparison.

Update error (`--dtype bfloat16`; `--errors-only` skips the timing and memory runs): for every SVF/SVFT
configuration and every adapted matrix, the trainable tensors are set to the same seeded values, of the same size in
every direction as Adam's steps make them (z = 1 + 0.2 N(0, 1); SVFT m_ij = 0.1 median(σ) N(0, 1)), and the update
adapter(x) − base(x) on 64 random tokens is compared with x·ΔWᵀ in float64 from the same float32 basis: relative
Frobenius error, median and max over the matrices. `floor` is what returning base + update in bf16 costs anyway
(the exact sum rounded to bf16, minus the rounded base).

Timing and memory as in step_time.py (harness.py): interleaved medians in one process, memory in a fresh process per
configuration (`--only`).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import load_smollm2, markdown_table, medians, run_step_benchmark, step_parser, step_settings, write_result
from torch import nn

import svdtune
from svdtune.linalg import Factorizer
from svdtune.methods.spectral import SpectralAdapter
from svdtune.methods.svf import SVF
from svdtune.methods.svft import SVFT


class BothSides(SpectralAdapter):
    """The two-sided factored forward: y = x Wᵀ + mix(x V) Uᵀ, mix = the update in σ units (SVF: d = S(cz − 1))."""

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.spectrum_change() if isinstance(self, SVF) else None
        h = F.linear(x.to(self.Vh.dtype), self.Vh)
        out = self.base(x)
        return out + F.linear(h * mix if mix is not None else self.mix(h), self.U).to(out.dtype)


class DenseRebuild(SpectralAdapter):
    """The official codes' forward: W' = U (diag(S) + Mix) Vᵀ built densely on every call, then x W'ᵀ + b."""

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.diag(self.spectrum_change()) if isinstance(self, SVF) else self.dense_m()
        weight = self.U @ (torch.diag(self.S) + mix) @ self.Vh
        return F.linear(x, weight.to(x.dtype), self.base.bias)


def holding(forward: type[SpectralAdapter]) -> Callable[[SpectralAdapter], None]:
    """Switch an adapter to `forward`, holding both sides of its basis (as U and Vh buffers)."""

    def change(adapter: SpectralAdapter) -> None:
        U, _, Vh = adapter.triplets()
        adapter.register_buffer("U", U.contiguous(), persistent=False)
        adapter.register_buffer("Vh", Vh.contiguous(), persistent=False)
        if "basis" in adapter._buffers:
            del adapter.basis
        adapter.__class__ = type(f"{forward.__name__}{type(adapter).__name__}", (forward, type(adapter)), {})

    return change


class OneSidedBefore(SVFT):
    """SVFT before it held both sides on 16-bit bases: one side of the float32 basis, Σ⁻¹ cut at p_max·eps·σ_1."""

    def coordinate_map(self, c: torch.Tensor) -> torch.Tensor:
        S = self.S
        inverse = torch.where(S > S[0] * torch.finfo(S.dtype).eps * max(self.shape), 1 / S, torch.zeros_like(S))
        return self.mix(c * inverse.to(c.dtype)) if self.output_side else self.mix(c) * inverse.to(c.dtype)


def one_sided(adapter: SVFT) -> None:
    """Switch an SVFT adapter to `OneSidedBefore`, keeping only the smaller side of its basis."""
    if adapter.two_sided:
        basis = adapter.U if adapter.output_side else adapter.Vh.T
        del adapter.U, adapter.Vh
        adapter.register_buffer("basis", basis.contiguous(), persistent=False)
    adapter.two_sided = False
    adapter.__class__ = OneSidedBefore


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
    "svft-plain-dense": ("svft", {}, holding(DenseRebuild)),
    "svft-banded-dense": ("svft", {"pattern": "banded", **BANDED}, holding(DenseRebuild)),
    "svft-plain-one-sided": ("svft", {}, one_sided),
    "svft-banded-one-sided": ("svft", {"pattern": "banded", **BANDED}, one_sided),
}


@torch.no_grad()
def set_trainables(adapter: SpectralAdapter, seed: int) -> None:
    """The same seeded values for every configuration of a matrix (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(adapter, SVF):
        adapter.z.copy_(1 + 0.2 * torch.randn(adapter.z.shape, generator=gen))
        return
    noise = torch.randn(adapter.m.shape, generator=gen, dtype=torch.float64)
    adapter.m.copy_((0.1 * float(adapter.S.median()) * noise).to(adapter.m.dtype))


def reference_delta(adapter: SpectralAdapter, W: torch.Tensor, factors: Factorizer) -> torch.Tensor:
    """ΔW in float64 from the float32 basis every configuration was built from."""
    U, S, Vh = (t.double() for t in factors.svd(W.float()))
    p = S.shape[0]
    if isinstance(adapter, SVF):
        middle = torch.diag(S * (adapter.scales().double() - 1))
    else:
        middle = torch.zeros(p, p, dtype=torch.float64).index_put((adapter.rows, adapter.cols), adapter.values().double())
    return U @ middle @ Vh


@torch.no_grad()
def update_errors(model: nn.Module, seed: int, factors: Factorizer) -> dict[str, float]:
    """Relative error of adapter(x) − base(x) against x·ΔWᵀ (float64), median and max over the adapted matrices,
    and the median of the bf16 output-rounding floor."""
    errors, floors = [], []
    for adapter in svdtune.adapters(model).values():
        set_trainables(adapter, seed + len(errors))
        W = adapter.base.weight
        x = torch.randn(64, W.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(W.dtype)
        exact = x.double() @ reference_delta(adapter, W, factors).T
        base = adapter.base(x)
        errors.append(float(((adapter(x).double() - base.double()) - exact).norm() / exact.norm()))
        y = x.double() @ W.double().T
        floors.append(float(((y + exact).to(W.dtype).double() - y.to(W.dtype).double() - exact).norm()
                            / exact.norm()))
    as_tensor = torch.tensor(errors)
    return {"median": round(float(as_tensor.median()), 5), "max": round(float(as_tensor.max()), 5),
            "floor_median": round(float(torch.tensor(floors).median()), 5), "matrices": len(errors)}


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
    parser.add_argument("--errors-only", action="store_true", help="measure the update errors only (bf16)")
    args = parser.parse_args()
    start = time.perf_counter()
    configs = ["lora", *(c for c in args.configs if c != "lora")]
    errors = {}
    if args.dtype != "float32" and not args.only:
        base = load_smollm2(args.device, args.dtype)
        with tempfile.TemporaryDirectory() as cache:  # one SVD per matrix for all configurations
            for config in configs[1:]:
                errors[config] = update_errors(prepare(copy.deepcopy(base), config, cache)[0], args.seed,
                                               Factorizer(cache))
                print(config, "update error", json.dumps(errors[config]), flush=True)
        del base
    if args.errors_only:
        table = markdown_table(["configuration", "update error median / max (floor)"],
                               [[c, error_cell(e)] for c, e in errors.items()])
        settings = {**step_settings(args), "wall_seconds": round(time.perf_counter() - start, 1)}
        write_result(args.out, "svf_svft_update_error", settings, errors, table)
        return
    measured = run_step_benchmark(__file__, args, configs, prepare)
    if measured is None:
        return
    trainable, seconds, memory, _flops = measured
    median = medians(seconds)
    lora_peak, lora_growth = memory["lora"]["peak_mb"], memory["lora"]["growth_mb"]
    rows = {config: {"method": CONFIGS[config][0], "options": CONFIGS[config][1], "median_s": round(median[config], 4),
                     "x_lora_time": round(median[config] / median["lora"], 3),
                     "x_lora_peak": round(memory[config]["peak_mb"] / lora_peak, 3),
                     "x_lora_growth": round(memory[config]["growth_mb"] / lora_growth, 3),
                     "trainable": trainable[config], "memory": memory[config], "update_error": errors.get(config),
                     "step_seconds": [round(s, 4) for s in seconds[config]]}
            for config in configs}
    header = ["configuration", "median step s", "× lora time", "peak MB", "× lora peak", "growth MB",
              "× lora growth", "trainable", "update error median / max (floor)"]
    table = markdown_table(header, [[c, f"{r['median_s']:.3f}", f"{r['x_lora_time']:.2f}",
                                     f"{r['memory']['peak_mb']:.0f}", f"{r['x_lora_peak']:.2f}",
                                     f"{r['memory']['growth_mb']:.0f}", f"{r['x_lora_growth']:.2f}",
                                     f"{r['trainable']:,}", error_cell(r["update_error"])] for c, r in rows.items()])
    settings = {**step_settings(args), "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "svf_svft_step", settings, rows, table)


def error_cell(error: dict[str, float] | None) -> str:
    return "-" if error is None else f"{error['median']:.2%} / {error['max']:.2%} ({error['floor_median']:.2%})"


if __name__ == "__main__":
    main()
