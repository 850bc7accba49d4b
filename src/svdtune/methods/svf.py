"""SVF, Singular Value Fine-tuning (Sun et al., Transformers², arXiv 2501.06252): scale every singular value.

    W' = U diag(S ⊙ c·z) Vᵀ,   ΔW = U diag(S ⊙ (c·z − 1)) Vᵀ,   z ∈ R^p trainable, p = min(m, n)

Trainable parameters per matrix: p. By default z is trained directly from z = 1 (ΔW = 0 exactly at init) and c = 1.
The Transformers² code's form is available as options: `parametrization="sigmoid"` trains θ with z = sigmoid(θ),
θ = 0.1 + 0.01·N(0, 1) at init, and `rescale=True` multiplies by c = Σσ / Σ(σ⊙z), which keeps the nuclear norm (and,
for near-equal z, the output at init) of W.

How U and V are held (`SpectralAdapter`, shared with SVFT): as non-persistent buffers in the weight's dtype next to
the untouched W (the adapter path is ((x V) ⊙ d) Uᵀ, d = S ⊙ (c·z − 1)), recomputed from the base at load — the base
fingerprint check guarantees the same weights, and the factor cache makes it cheap. The trade-off, per m x n matrix
and T tokens (benchmarks/svf_svft_step.py measures it on SmolLM2-135M):

* kept W + factored path (chosen): (m + n)·p extra frozen values (1.3–2× the weight) and T·p·(m + n) extra
  multiply-adds per pass, i.e. the adapted layer costs 2–3× the frozen one, where LoRA's costs ~1.02×. On SmolLM2-135M
  (all 7 projections) that is ~2× LoRA's step FLOPs and +632 MB in float32: the 1.3× goal is out of reach while W is
  kept at full p, and this is the floor for an exact, function-preserving SVF. No dense W' is ever built.
* the official dense rebuild (W' = U diag(S c z) Vᵀ every step): m·n·p multiply-adds per matrix per step, more than
  the tokens' own compute at small batches, plus a dense W' and its gradient per matrix in memory.
* W replaced by its factors (y = ((x V) ⊙ S c z) Uᵀ): ~1.3× LoRA's FLOPs and (m + n)·p − m·n extra values, but the
  model's base would no longer be the user's weight (not bit-exact at init, `unload` not exact), so it is not offered.
* U, V in bfloat16: half the extra memory and a faster path on CPUs with bf16 units, at bf16 rounding of ΔW's path.
ΔW is full-rank in general: `low_rank()` is None, and a PEFT export needs a truncation rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import Adapter
from ..linalg import Factorizer, factor_dtype

PARAMETRIZATIONS = ("direct", "sigmoid")


class SpectralAdapter(Adapter):
    """Shared by SVF and SVFT: ΔW = U·Mix·Vᵀ over the top singular triplets of W, computed factored as
    y = base(x) + mix(x V) Uᵀ, with no dense W' per step. A subclass defines `mix` (h ↦ h Mixᵀ on the last axis).

    U, S, Vh are non-persistent buffers in the weight's dtype: they are as large as W, and recomputing them at load is
    safe because loading checks that the base weight is bit-identical to the one the adapter was trained on (and
    cheap with the factor cache).
    """

    def basis_rank(self, m: int, n: int) -> int:
        """How many singular triplets the update spans (all min(m, n) unless a method truncates)."""
        return min(m, n)

    def rebuild(self, W: torch.Tensor, factors: Factorizer) -> None:
        U, S, Vh = factors.svd(W, dtype=factor_dtype(self.config.factor_dtype))
        k = self.basis_rank(*W.shape)
        self.register_buffer("U", U[:, :k].to(W.dtype).contiguous(), persistent=False)
        self.register_buffer("S", S[:k].to(W.dtype), persistent=False)
        self.register_buffer("Vh", Vh[:k].to(W.dtype).contiguous(), persistent=False)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """h Mixᵀ for h = x V (..., p), in h's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + F.linear(self.mix(F.linear(x.to(self.U.dtype), self.Vh)), self.U).to(out.dtype)


@dataclass(frozen=True)
class SVFConfig:
    parametrization: str = "direct"  # "direct": z trained from 1; "sigmoid": z = sigmoid(θ) (Transformers² code)
    rescale: bool = False  # multiply by Σσ / Σ(σ⊙z), keeping the nuclear norm (Transformers² code)
    factor_dtype: str = "float32"  # precision of the SVD: "float32" or "float64"

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        factor_dtype(self.factor_dtype)


class SVF(SpectralAdapter):
    name = "svf"
    Config = SVFConfig
    paper = "SVF / Transformers², Sun et al. 2025, arXiv 2501.06252"
    delta_formula = "ΔW = U·diag(S ⊙ (c·z − 1))·Vᵀ, z = 1 at init"
    params_formula = "min(m, n)"

    @classmethod
    def count_trainable(cls, m: int, n: int, config: SVFConfig) -> int:
        return min(m, n)

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        p = min(W.shape)
        if self.config.parametrization == "direct":
            self.z = nn.Parameter(torch.ones(p, dtype=W.dtype, device=W.device))
        else:
            self.theta = nn.Parameter(0.1 + 0.01 * torch.randn(p, dtype=W.dtype, device=W.device))
        self.rebuild(W, factors)

    def scales(self) -> torch.Tensor:
        """c·z: the factor each singular value is multiplied by."""
        z = self.z if self.config.parametrization == "direct" else torch.sigmoid(self.theta)
        if self.config.rescale:
            z = z * (self.S.sum() / (self.S * z).sum())
        return z

    def spectrum_change(self) -> torch.Tensor:
        """d = S ⊙ (c·z − 1): the change of each singular value."""
        return self.S * (self.scales() - 1)

    def delta(self) -> torch.Tensor:
        return (self.U * self.spectrum_change()) @ self.Vh

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.spectrum_change().to(h.dtype)
