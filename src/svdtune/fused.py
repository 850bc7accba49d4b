"""One fused kernel for every low-rank adapter path: y = x Wᵀ + b + s (x Aᵀ) Bᵀ.

Why it exists: the textbook adapter path `out + s * F.linear(F.linear(x, A), B)` spends most of its time in two
skinny products with a large output, (x Aᵀ) Bᵀ in the forward pass and (g B) A in the backward pass: with inner
dimension r, BLAS runs them several times slower than accumulating the same product into an existing tensor
(`out.addmm_(h, Bᵀ)`), and autograd then pays one more full-size add per path in each direction
(`benchmarks/step_time.py` measures the whole step; figures in `benchmarks/RESULTS.md`). This function computes
the base product first and accumulates the rank-r product into it in place, in both directions; the scale s is
applied to the r-wide intermediate, never to a full-size tensor. The arithmetic is the textbook one (same products,
same order of accumulation up to the in-place add), so it agrees with it to rounding. In the backward pass the
rank-r products are taken in their fastest orientation as well (`_LowRankLinear.backward`).

The caller keeps the textbook path where this one does not apply (see `fusable`): autocast (the in-place
accumulate would mix dtypes), dtype mismatches, and a base layer with forward hooks (accelerate's offloading and
FSDP2 run code there; calling the base layer's weight directly would skip it).

Decoding on a CPU with a 16-bit base and float32 factors takes `few_rows_product` instead: the rank-r path in
float32, where oneDNN's bf16 products cost a fixed tens of µs per call whatever their size (see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function


def fusable(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """True when `low_rank_linear` may replace base(x) + the adapter path for this call (`weight`: the base's, which
    the caller has already looked up; `adapter_linear` then takes the factors in whatever dtype they are)."""
    if base._forward_hooks or base._forward_pre_hooks or x.dtype != weight.dtype:
        return False
    device = x.device
    return device == weight.device and not torch.is_autocast_enabled(device.type)


def fused_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                  B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ + b + h Bᵀ, h) with h = s x Aᵀ: the base product first, the rank-k product accumulated into it."""
    h = F.linear(x.reshape(-1, x.shape[-1]), A)  # F.linear: one dispatch, where `rows @ A.T` takes two
    if scale != 1.0:
        h = h * scale
    out = F.linear(x, weight, bias)
    out.view(-1, out.shape[-1]).addmm_(h, B.T)
    return out, h


# Up to this many rows the rank-r path of a 16-bit base runs in float32 on a CPU (`few_rows_product`). Measured on a
# Xeon with AMX, rank 8, 576 -> 576 or 1536 outputs: the bf16 path (casting the factors, two oneDNN products) takes
# 101-149 µs at 1 row, 104-116 µs at 16 and 116-127 µs at 64, the float32 one 15-25, 28-57 and 69-100 µs; at 256 rows
# bf16 wins. The bound stays at 16, a decoding step of up to 16 sequences: scoring and training inputs are longer,
# and keep the bf16 kernel and its numerics.
FEW_ROWS = 16


def decoding_on_cpu(x: torch.Tensor) -> bool:
    """No gradient, a CPU, at most FEW_ROWS rows: where `few_rows_product` is the faster path."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]


def few_rows_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                     B: torch.Tensor, scale: float) -> torch.Tensor:
    """x Wᵀ + b + s (x Aᵀ) Bᵀ with a 16-bit W and wider factors (float32 adapters on a bf16 or fp16 base), for a few
    rows: the base product in W's dtype, the rank-r path in the factors' dtype, added into it in place (one
    rounding). Why: a one-token decoding step on a CPU; oneDNN's bf16 product costs tens of µs per call however
    small, and casting the factors to bf16 two more calls, where MKL's float32 products of a few rows take a few µs
    (`FEW_ROWS`). The factors are used as stored, unrounded: as exact as PEFT's float32 adapter path, slightly more
    than the bf16 path of a long input."""
    out = F.linear(x, weight, bias)
    return out.add_(F.linear(F.linear(x.to(A.dtype), A), B), alpha=scale)


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   B: torch.Tensor, scale: float) -> torch.Tensor:
    """x Wᵀ + b + s (x Aᵀ) Bᵀ for an adapter whose factors may be wider than W (float32 on a 16-bit base), where
    `fusable` holds: `few_rows_product` for a decoding step on a CPU (no gradient, at most FEW_ROWS rows), else
    `low_rank_linear` with the factors cast to W's dtype (only when they differ: `.to` costs a dispatch even when it
    changes nothing)."""
    dtype = weight.dtype
    if A.dtype != dtype and A.dtype == B.dtype and decoding_on_cpu(x):
        return few_rows_product(x, weight, bias, A, B, scale)
    return low_rank_linear(x, weight, bias, A if A.dtype == dtype else A.to(dtype),
                           B if B.dtype == dtype else B.to(dtype), scale)


def times_factor(g: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """g B for an output gradient g (rows x m) and a factor B (m x r), in the orientation the CPU's library runs
    fastest: MKL (float32) runs (Bᵀ gᵀ)ᵀ faster, oneDNN (bf16, fp16) g B itself (a bf16 step on a Xeon with AMX: 2%
    less time; float32 1% more)."""
    return g @ B if g.dtype.itemsize == 2 else (B.T @ g.T).T


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):  # noqa: ANN001, ANN205 (autograd's signature)
        out, h = fused_product(x, weight, bias, A, B, scale)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, A, B, h = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_A, needs_B, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        # Products with inner dimension r are computed in the orientation the CPU's library runs fastest: (hᵀ g)ᵀ
        # rather than gᵀ h, and g B as `times_factor` says.
        gh = times_factor(g, B)  # gradient of the scaled intermediate h = s x Aᵀ
        if ctx.scale != 1.0:
            gh = gh * ctx.scale
        grad_x = grad_weight = grad_bias = grad_A = grad_B = None
        if needs_x:
            grad_x = (g @ weight).addmm_(gh, A).view_as(x)
        if needs_weight:
            grad_weight = g.T @ rows
        if needs_bias:
            grad_bias = g.sum(0)
        if needs_A:
            grad_A = gh.T @ rows
        if needs_B:
            grad_B = (h.T @ g).T
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                    B: torch.Tensor, scale: float) -> torch.Tensor:
    """x Wᵀ + b + scale (x Aᵀ) Bᵀ with W: m x n, A: k x n, B: m x k (k may be any width), fused as described above.
    With gradients off (inference, generation) the autograd Function is skipped: its per-call bookkeeping is a
    visible share of a one-token decoding step, where every product is tiny. It takes part in PyTorch's
    `__torch_function__` protocol, so a mode such as `upcast.Float32Products` sees it as one product."""
    if has_torch_function((x, weight, A, B)):
        return handle_torch_function(low_rank_linear, (x, weight, A, B), x, weight, bias, A, B, scale)
    if not torch.is_grad_enabled():
        return fused_product(x, weight, bias, A, B, scale)[0]
    return _LowRankLinear.apply(x, weight, bias, A, B, float(scale))
