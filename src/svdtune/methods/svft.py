"""SVFT, Singular Vectors guided Fine-Tuning (Lingam et al., arXiv 2405.19597): a sparse mix of singular vectors.

    W' = U (Σ + g·M) Vᵀ,   ΔW = g · U M Vᵀ = g · Σ_{(i,j) ∈ Ω} m_ij u_i v_jᵀ

U, Σ, V are the top-p singular triplets of W (p = min(m, n), or `rank` if smaller), frozen; only the entries m_ij of
the p x p matrix M on a fixed support Ω train. Patterns for Ω:

* `plain`: the diagonal, |Ω| = p (additive singular-value tuning: SVF with z = 1 + m/S);
* `banded`: offsets 0, ±1, …, ±d, |Ω| = p(2d+1) − d(d+1);
* `random`: as many entries as `banded`, drawn without replacement from the p² positions (seeded, so no duplicates,
  unlike the official code's sampling with replacement);
* `top_k`: as many entries, the largest |alignment| A_ij = |u_iᵀ v_j| (the paper's criterion, not the official
  code's signed U·Vh). For non-square W, u_i ∈ R^m and v_j ∈ R^n live in different spaces with no canonical map
  between them; we compare them on the coordinates both spaces share (the first min(m, n)), i.e. we embed the smaller
  space into the larger one by zero-padding. That is the paper's inner product when m = n and a stated convention
  otherwise (the official code instead ranks the raw entries of the square factor).

Trainable parameters per matrix: |Ω| (+1 with `gate=True`). Defaults are function-preserving: M = 0 and g = 1, so
ΔW = 0 at init. The official code's choices are options: `gate=True` trains g = sigmoid(γ), γ = 0 at init, and
`init="kaiming"` draws M ~ N(0, 2/|Ω|) (so ΔW ≠ 0 at init). Plain and banded updates are full-rank in general:
`low_rank()` is None.

How the basis is held: like SVF's (`SpectralAdapter`), only the smaller side of it, U or V (min(m, n) x p), next
to the untouched W, recomputed at load; the support (row and column indices) is saved with the adapter, so top-k and
random supports never depend on a recomputation. The forward never builds a dense W' or touches the other side: with
c the singular coordinates of the output (c = Uᵀ(y − b) = Σ Vᵀ x) the update is U·g·M·Σ⁻¹c, and with those of the
input (c = Vᵀ x) it is W V·Σ⁻¹·g·M c; g·M c is an element-wise product for the diagonal and a dense p x p product
otherwise (`SVFT.mix`). Σ⁻¹ is the pseudo-inverse (singular values below the numerical-rank tolerance
p_max·eps·σ_1 count as zero): an exactly rank-deficient W cannot route the update through its null space, which
real weights do not have.
Cost over the frozen layer: p² frozen values and 2·T·p² multiply-adds for T tokens;
benchmarks/svf_svft_step.py measures it against LoRA and against rebuilding W' every step (the official code's way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import Factorizer, factor_dtype
from .svf import SpectralAdapter

PATTERNS = ("plain", "banded", "random", "top_k")
INITS = ("zero", "kaiming")
DEFAULT_D = 2  # the paper's smallest banded/random variant, SVFT^{B,R}_{d=2}


@dataclass(frozen=True)
class SVFTConfig:
    pattern: str = "plain"  # support of M: "plain", "banded", "random" or "top_k"
    d: int | None = None  # off-diagonals per side (banded), or the matching count (random, top_k); None: 0 / 2
    rank: int | None = None  # use only the top-`rank` singular vectors; None: all min(m, n)
    init: str = "zero"  # M at init: "zero" (ΔW = 0) or "kaiming" (N(0, 2/|Ω|), the official code)
    gate: bool = False  # scale M by a trained sigmoid(γ), γ = 0 at init (the official code)
    seed: int = 0  # seed of the `random` support
    factor_dtype: str = "float32"  # precision of the SVD: "float32" or "float64"

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.pattern == "plain" and self.d not in (None, 0):
            raise ValueError(f"d={self.d} has no effect with pattern='plain' (the diagonal); use pattern='banded', "
                             "'random' or 'top_k' for off-diagonal entries")
        if self.d is not None and not (isinstance(self.d, int) and self.d >= 0):
            raise ValueError(f"d must be an integer >= 0, got {self.d!r}")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be an integer >= 1 or None, got {self.rank!r}")
        factor_dtype(self.factor_dtype)

    @property
    def off_diagonals(self) -> int:
        if self.d is not None:
            return self.d
        return 0 if self.pattern == "plain" else DEFAULT_D

    def basis_size(self, m: int, n: int) -> int:
        """p: how many singular triplets of an m x n weight M spans."""
        return min(m, n) if self.rank is None else min(self.rank, m, n)

    def support_size(self, m: int, n: int) -> int:
        """|Ω| = p(2d+1) − d(d+1): the banded count, shared by random and top_k (METHODS.md §3)."""
        p, d = self.basis_size(m, n), self.off_diagonals
        return p * (2 * d + 1) - d * (d + 1)


def support(pattern: str, p: int, d: int, *, alignment: torch.Tensor | None = None,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of Ω in a p x p matrix, distinct, sorted row-major. `alignment` (p x p) is needed for top_k."""
    if d >= p:
        raise ValueError(f"d={d} needs d < p = {p} singular vectors (a band wider than the matrix); pick a smaller d, "
                         "or exclude this module with targets=...")
    k = p * (2 * d + 1) - d * (d + 1)
    if pattern in ("plain", "banded"):
        i, j = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        flat = ((i - j).abs() <= d).flatten().nonzero().squeeze(1)
    elif pattern == "random":
        flat = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))[:k]
    else:
        flat = alignment.abs().flatten().topk(k).indices.cpu()
    flat = flat.sort().values
    return flat // p, flat % p


class SVFT(SpectralAdapter):
    name = "svft"
    Config = SVFTConfig
    paper = "SVFT, Lingam et al. 2024, arXiv 2405.19597"
    delta_formula = "ΔW = g·U·M·Vᵀ, M sparse on Ω (plain/banded/random/top_k), M = 0 at init"
    params_formula = "|Ω| = p(2d+1) − d(d+1), p = min(m, n) (+1 with gate)"

    @classmethod
    def count_trainable(cls, m: int, n: int, config: SVFTConfig) -> int:
        return config.support_size(m, n) + int(config.gate)

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        cfg, p = self.config, self.config.basis_size(*W.shape)
        triplets = factors.svd(W, dtype=factor_dtype(cfg.factor_dtype))
        shared = min(W.shape)  # top_k compares u_i and v_j on the coordinates both spaces share (module docstring)
        alignment = triplets.U[:shared, :p].T @ triplets.Vh[:p, :shared].T if cfg.pattern == "top_k" else None
        rows, cols = support(cfg.pattern, p, cfg.off_diagonals, alignment=alignment, seed=cfg.seed)
        self.set_basis(triplets, W.dtype)
        self.register_buffer("rows", rows.to(W.device))
        self.register_buffer("cols", cols.to(W.device))
        k = rows.numel()
        std = math.sqrt(2.0 / k) if cfg.init == "kaiming" else 0.0
        self.m = nn.Parameter(torch.randn(k, dtype=W.dtype, device=W.device) * std)
        if cfg.gate:
            self.gate = nn.Parameter(torch.zeros((), dtype=W.dtype, device=W.device))

    def basis_rank(self, m: int, n: int) -> int:
        return self.config.basis_size(m, n)

    def values(self) -> torch.Tensor:
        """g·m: the entries of M on Ω, gate applied."""
        return self.m * torch.sigmoid(self.gate) if self.config.gate else self.m

    def dense_m(self) -> torch.Tensor:
        """g·M as a dense p x p matrix (the random and top_k forward multiplies by it)."""
        p = self.S.shape[0]
        return torch.zeros(p, p, dtype=self.m.dtype, device=self.m.device).index_put((self.rows, self.cols),
                                                                                        self.values())

    def inverse_singular_values(self) -> torch.Tensor:
        """Σ⁻¹ as a pseudo-inverse: 0 for singular values below the numerical-rank tolerance."""
        S = self.S
        tol = S[0] * torch.finfo(S.dtype).eps * max(self.shape)
        return torch.where(S > tol, 1 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """g·M h on the last axis: an element-wise product for the diagonal (plain), else a product with M made dense
        (p x p). The dense product saves only h for the backward, where a gather of the |Ω| needed columns and a
        scatter-add would save 2d+1 times as much; on SmolLM2-135M at 4x128 tokens that took SVFT's peak training
        memory from 2.04x LoRA's to 1.26x for the same step time (benchmarks/svf_svft_step.py)."""
        if self.config.pattern == "plain":  # Ω is the diagonal, rows = cols = 0..p-1 in order
            return h * self.values().to(h.dtype)
        return h @ self.dense_m().to(h.dtype).T

    def coordinate_map(self, c: torch.Tensor) -> torch.Tensor:
        inverse = self.inverse_singular_values().to(c.dtype)
        return self.mix(c * inverse) if self.output_side else self.mix(c) * inverse
