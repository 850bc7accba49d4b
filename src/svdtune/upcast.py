"""bf16 matrix products computed as float32 products of the same bf16 values, on CPUs without bf16 matrix units.

Why it exists: a bf16 base (`recipes.fine_tune(precision="bf16")`, the `llm` bench suite) is what trains fast on a
CPU with bf16 matrix units (AMX, AVX-512 BF16) or a GPU. On a CPU without them PyTorch falls back to a scalar bf16
kernel: one 512x576 by 576x1536 product is 35x slower than in float32 on an AVX2-only EPYC, and a SmolLM2-135M
training step on a bf16 base 25x slower than on a float32 one. The arithmetic a bf16 matrix unit does is: multiply
bf16 inputs, accumulate in float32, round the result to bf16 once. The product of two bf16 numbers is exact in
float32 (8 + 8 significant bits fit in 24), so a float32 product of the bf16 values followed by one rounding to bf16
is the same computation, up to the order of accumulation, at float32 speed. `Float32Products` does that for every
matrix product of the model (forward and, because autograd records the float32 product, backward too); the weights
stay bf16 in memory and every tensor the model hands on stays bf16.

The one place where it is slightly more exact than a bf16 unit: svdtune's fused adapter call
(`fused.low_rank_linear`) accumulates its rank-r product into the base product in place; under this mode both run in
float32 and the sum is rounded once, where the bf16 path rounds the base product first.

`bf16_products(model)` turns it on only where it applies (some parameter in bf16 on a CPU that emulates bf16), so
callers wrap training and scoring in it unconditionally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .fused import low_rank_linear
from .hardware import bf16_emulated

# The products a transformer's step spends its time in; everything else (norms, activations, softmax) is
# element-wise and vectorised in bf16 on any CPU.
PRODUCTS: frozenset[Callable[..., Any]] = frozenset({
    F.linear, F.scaled_dot_product_attention, low_rank_linear,
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm,
    torch.Tensor.baddbmm,
})


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_up(v) for v in value)
    return value


def _floating(values: Any) -> Iterator[torch.dtype]:
    """The dtypes of the floating-point tensors among `values` (lists and tuples opened)."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            yield v.dtype
        elif isinstance(v, (list, tuple)):
            yield from _floating(v)


def _all_bf16(args: tuple, kwargs: dict) -> bool:
    """True for a product whose floating-point operands are all bf16: a mixed call keeps PyTorch's own dtype error,
    and one that writes into `out=` its own kernel (a float32 copy of `out` would receive the result instead)."""
    return "out" not in kwargs and set(_floating((*args, *kwargs.values()))) == {torch.bfloat16}


class Float32Products(TorchFunctionMode):
    """Inside the block, every product in `PRODUCTS` whose floating-point operands are all bf16 runs on float32
    copies of them and returns its result rounded to bf16: the numerics of a bf16 matrix unit at float32 speed (see
    the module)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in PRODUCTS or not _all_bf16(args, kwargs):
            return func(*args, **kwargs)
        out = func(*_up(args), **{k: _up(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16) if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def bf16_products(model: nn.Module) -> contextlib.AbstractContextManager:
    """`Float32Products()` when `model` holds bf16 parameters on a CPU without bf16 matrix units, else a no-op."""
    bf16 = next((p for p in model.parameters() if p.dtype == torch.bfloat16), None)
    return Float32Products() if bf16 is not None and bf16_emulated(bf16.device) else contextlib.nullcontext()
