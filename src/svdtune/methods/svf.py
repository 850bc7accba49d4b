"""SVF, Singular Value Fine-tuning (Sun et al., Transformers², arXiv 2501.06252): scale every singular value.

    W' = U diag(S ⊙ c·z) Vᵀ,   ΔW = U diag(S ⊙ (c·z − 1)) Vᵀ,   z ∈ R^p trainable, p = min(m, n)

Trainable parameters per matrix: p. By default z is trained directly from z = 1 (ΔW = 0 exactly at init) and c = 1.
The Transformers² code's form is available as options: `parametrization="sigmoid"` trains θ with z = sigmoid(θ),
θ = 0.1 + 0.01·N(0, 1) at init, and `rescale=True` multiplies by c = Σσ / Σ(σ⊙z), which keeps the nuclear norm (and,
for near-equal z, the output at init) of W. The sigmoid form implies the rescale, as in that code, which always
applies both: without it z ≈ 0.525 at init would halve every weight at step 0, so `rescale=False` with
`parametrization="sigmoid"` is refused. The direct form may take the rescale or not (default not).

How the basis is held: one side of it, next to the untouched W (`spectral.SpectralAdapter`, shared with SVFT).
ΔW is full-rank in general: `low_rank()` is None, and a PEFT export needs a truncation rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import Factorizer, factor_dtype
from .spectral import SpectralAdapter

PARAMETRIZATIONS = ("direct", "sigmoid")


@dataclass(frozen=True)
class SVFConfig:
    parametrization: str = "direct"  # "direct": z trained from 1; "sigmoid": z = sigmoid(θ) (Transformers² code)
    rescale: bool | None = None  # multiply by Σσ / Σ(σ⊙z), keeping the nuclear norm; None: True for sigmoid only
    factor_dtype: str = "float32"  # precision of the SVD: "float32" or "float64"

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        sigmoid = self.parametrization == "sigmoid"
        if self.rescale is None:
            object.__setattr__(self, "rescale", sigmoid)  # stored resolved, so a saved config says what ran
        if sigmoid and not self.rescale:
            raise ValueError("parametrization='sigmoid' needs rescale=True (z = sigmoid(θ) starts near 0.525, so "
                             "without the nuclear-norm rescale every weight is about halved at step 0); drop "
                             "rescale=False, or use parametrization='direct'")
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

    def coordinate_map(self, c: torch.Tensor) -> torch.Tensor:
        return c * (self.scales() - 1).to(c.dtype)  # K = diag(c·z − 1) commutes with Σ: the same on both sides
