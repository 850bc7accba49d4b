"""The Adapter contract: every method is a change ΔW to one frozen linear layer.

An `Adapter` owns the frozen layer it wraps (`base`: an `nn.Linear`, or a GPT-2 style `Conv1D` whose weight is stored
transposed) and never edits its weight. A method implements `init(W, factors)`, which builds its trainable parameters
and frozen buffers from the weight W (m x n, PyTorch's out x in), and `delta()`, the dense ΔW. Everything else (merge,
export, the tests, the default forward) is written once against `delta()`; a method may add a fast factored `forward`,
`low_rank()` factors for export, and `extra_loss()` for regularisers.

Why the base is never edited, even for residual methods (PiSSA, MiLoRA, OLoRA): their frozen residual
W_res = W - s B0 A0 is kept implicit by subtracting the frozen initial factors in the adapter path. That makes
`unload` exact, save/load exact, the rank-2r export to a LoRA on the original weights exact, and avoids rounding
W_res to a bf16 base, for the price of a rank-2r instead of rank-r adapter path.

Precision: on a bfloat16 or float16 base, an adapter's own tensors (trainable factors, frozen factors, bases) are
float32, built from the weight upcast to float32 (`working_weight`), so optimizer state and SVD-derived buffers keep
full precision while the frozen products run in the base's dtype (as PEFT does by default). The low-rank forward
runs the rank-r path in the activations' dtype (the factors cast per call, gradients flowing back to the float32
masters), which is what makes a bf16 base fast on hardware with bf16 matrix units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layer, weight stored transposed (in x out)

from .fused import adapter_linear, fusable
from .linalg import Factorizer, default_cache_dir

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for the layer types svdtune can adapt."""
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as W (out x in), whatever its storage convention (a view, not a copy)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's own tensors on a base of `weight_dtype`: float32 for 16-bit bases (their optimizer
    state and SVD bases would lose too much in 16 bits), the base's own dtype otherwise (float32, float64)."""
    return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else weight_dtype


def working_weight(layer: nn.Module) -> torch.Tensor:
    """W (out x in), detached, in the adapter's dtype: what `init` and `rebuild` compute from (no copy unless the
    base is 16-bit)."""
    W = weight_matrix(layer).detach()
    return W.to(adapter_dtype(W.dtype))


@dataclass(slots=True)
class LowRank:
    """Exact factors of an update: ΔW = scale * B @ A, B: m x k, A: k x n (PEFT's lora_B, lora_A). Built at every
    adapter call (`LowRankAdapter.path`), hence slots and not frozen (a frozen dataclass sets each field through
    `object.__setattr__`, three times slower): a one-token decoding step makes one per adapted layer."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


class Adapter(nn.Module):
    """Base class: a frozen linear layer plus a learned change ΔW (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    paper: ClassVar[str]
    delta_formula: ClassVar[str]
    params_formula: ClassVar[str]

    def __init__(self, base: nn.Module, config: Any, factors: Factorizer | None = None) -> None:
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or Conv1D layers, got {type(base).__name__}")
        self.base = base.requires_grad_(False)  # registered as a submodule, read through the `base` property
        self.config = config
        self.enabled = True
        self.train(base.training)  # a new module starts in training mode; an adapter follows the layer it wraps
        if factors is not None:
            self.init(working_weight(base), factors)

    # --- what a method implements -------------------------------------------------------------------------------
    @classmethod
    def count_trainable(cls, m: int, n: int, config: Any) -> int:
        """The paper's trainable-parameter count for one m x n matrix (the tests hold `init` to it)."""
        raise NotImplementedError

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        """Create parameters and frozen buffers from the frozen weight W (m x n), given in the adapter's dtype
        (`adapter_dtype`): tensors created in W.dtype are float32 on a 16-bit base."""
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        """The dense change ΔW (m x n) this adapter adds to the original weight."""
        raise NotImplementedError

    def rebuild(self, W: torch.Tensor, factors: Factorizer) -> None:
        """Recompute the non-persistent buffers (large bases such as SVF's U, V) from W after a load."""

    def low_rank(self) -> LowRank | None:
        """Exact low-rank factors of `delta()` relative to the original weight, or None for full-rank methods."""
        return None

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser for the training loss, or None; the loop adds the mean over adapters (`regularisation`)."""
        return None

    # --- shared behaviour ----------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The wrapped frozen layer. A registered submodule like any other (`nn.Module.__setattr__` puts it in
        `_modules`); this property reads it from there directly, where plain attribute access would first fail
        through the class hierarchy into `nn.Module.__getattr__`: a cost paid on every adapter call, and a visible
        share of a one-token decoding step (`benchmarks/inference.py`)."""
        try:
            return self._modules["base"]
        except KeyError:  # not set yet: hasattr and getattr(..., default) expect an AttributeError
            raise AttributeError(f"{type(self).__name__} has no base layer yet") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone while disabled (`inject.disabled`), else `adapted(x)`."""
        return self.adapted(x) if self.enabled else self.base(x)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + ΔW x; this default builds the dense ΔW, methods with a cheaper factored form override it."""
        out = self.base(x)
        return out + F.linear(x.to(out.dtype), self.delta().to(out.dtype))

    def dropout_rate(self) -> float:
        """The adapter path's input dropout now: the config's `dropout` while training, 0 otherwise."""
        return getattr(self.config, "dropout", 0.0) if self.training else 0.0

    @property
    def shape(self) -> tuple[int, int]:
        m, n = weight_matrix(self.base).shape
        return m, n

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's own persistent tensors (parameters and saved buffers), without the frozen base."""
        tensors = dict(self.named_parameters(recurse=False))
        saved = (k for k in self._buffers if k not in self._non_persistent_buffers_set)
        tensors.update((k, self._buffers[k]) for k in saved)
        return tensors

    def trainable_names(self) -> list[str]:
        return [k for k, p in self.named_parameters(recurse=False) if p.requires_grad]

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with ΔW folded into its weight (added in float32 or better, cast back once)."""
        weight = self.base.weight
        delta = self.delta()
        if isinstance(self.base, Conv1D):
            delta = delta.T
        acc = torch.promote_types(weight.dtype, torch.float32)
        weight.copy_((weight.to(acc) + delta.to(acc)).to(weight.dtype))
        return self.base

    @classmethod
    def restore(cls, base: nn.Module, config: Any, tensors: dict[str, torch.Tensor], trainable: set[str],
                factors: Factorizer | None = None) -> Adapter:
        """Rebuild a saved adapter from its tensors, bit-exactly; only non-persistent buffers are recomputed."""
        adapter = cls(base, config, factors=None)
        for key, t in tensors.items():
            if key in trainable:
                setattr(adapter, key, nn.Parameter(t))
            else:
                adapter.register_buffer(key, t)
        adapter.rebuild(working_weight(base), factors or Factorizer(default_cache_dir()))
        return adapter

    def extra_repr(self) -> str:
        m, n = self.shape
        return f"{self.name}: {m}x{n}, {self.config}"


class LowRankAdapter(Adapter):
    """An adapter whose update is low-rank by construction: ΔW = s·B·A for factors a method derives from its own
    tensors (LoRA's B, A; PiSSA's [B | −B0], [A ; A0]; LoRA-XS's U_r, R·Σ_r·V_rᵀ; AdaLoRA's P, diag(λ⊙mask)·Q, ...).

    Every such method shares one forward, base(x) + s·(dropout(x)·Aᵀ)·Bᵀ, run by the fused kernel where it applies;
    a method only says which factors its forward runs with (`path`), by default its exact `low_rank()` factors."""

    def path(self) -> LowRank:
        """The factors the forward multiplies by, with static shapes (masked slots stay as zeros, so a pruned rank
        never changes a tensor's shape under an optimizer); the default is `low_rank()`."""
        return self.low_rank()

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.path()
        return self.low_rank_forward(x, factors.A, factors.B, factors.scale)

    def low_rank_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """base(x) + scale (dropout(x) Aᵀ) Bᵀ (dropout: the config's `dropout`, if it has one, while training):
        fused where `fused.fusable` allows and no dropout is active (`fused.adapter_linear`, which takes the factors
        in any dtype), textbook otherwise."""
        p = self.dropout_rate()
        base = self.base
        weight = None if p else weight_matrix(base)  # the fused path only runs without dropout
        if weight is not None and fusable(base, weight, x):
            return adapter_linear(x, weight, base.bias, A, B, scale)
        out = base(x)
        h = F.dropout(x.to(A.dtype), p) if p else x.to(A.dtype)
        return out + (scale * F.linear(F.linear(h, A), B)).to(out.dtype)


def owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of t in `dtype` that owns exactly its elements. Factors are often slices (R[:r] of a full
    QR, U[:, :r] of a full SVD); keeping the slice itself would keep the whole factorisation alive in memory."""
    return t.to(dtype).clone(memory_format=torch.contiguous_format)


def regularisation(found: Iterable[Adapter]) -> torch.Tensor | None:
    """The mean of the adapters' `extra_loss()` terms (None when none has one): a coefficient then means the same
    whatever the number of adapted matrices, as in AdaLoRA's code."""
    terms = [t for t in (a.extra_loss() for a in found) if t is not None]
    return sum(terms) / len(terms) if terms else None


def require_rank_below(r: int, W: torch.Tensor) -> None:
    """Low-rank methods need r < min(m, n); at r >= min(m, n) the 'low-rank' update is a dense reparametrisation."""
    p = min(W.shape)
    if r >= p:
        raise ValueError(f"r={r} must be smaller than min(out, in) = {p} for this {W.shape[0]}x{W.shape[1]} weight; "
                         f"pick r < {p} or exclude the module with targets=...")
