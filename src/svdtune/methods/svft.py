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

How the basis is held, and why it depends on the precision. The cheap layout, `one-sided`, is SVF's
(`SpectralAdapter`): only the smaller side of the basis, U or V (min(m, n) x p), next to the untouched W, recomputed
at load. With c the singular coordinates of the output (c = Uᵀ(y − b) = Σ Vᵀ x) the update is U·g·M·Σ⁻¹c, and
with those of the input (c = Vᵀ x) it is W V·Σ⁻¹·g·M c. Both routes pass a rounded value through Σ⁻¹: the base's
output y (output side), or x + V Σ⁻¹ g M c before W multiplies it (input side). A rounding error of relative size u
in that value becomes an error of about u·κ in the update (κ = σ_1/σ_p, the condition number). So one-sided is
kept only where u·κ <= 1e-3 (`SIGMA_INVERSE_LIMIT`, u the unit roundoff of the weight's dtype, measured on the
computed S); otherwise the adapter holds both sides, U (m x p) and Vᵀ (p x n), and computes ΔW x = U·g·M·Vᵀ x
directly, with no Σ⁻¹ at all (`two_sided`). In practice:

* bfloat16 / float16 base (u = 2⁻⁸ / 2⁻¹¹): always two-sided (u·κ > 1e-3 already at κ = 1 for bf16), in float32
  (`core.adapter_dtype`). The one-sided route is what made SVFT useless there: with the old numerical-rank cut-off
  of Σ⁻¹ at p_max·eps·σ_1 in the basis' dtype, a bf16 basis zeroed every 1/σ of a layer wider than 128 (no update,
  no gradient); with a float32 basis the rounding of the bf16 output is still amplified by κ.
* float32 base: one-sided when κ <= 8.4e3, which is most real matrices (SmolLM2-135M: 194 of its 210; 16 q_proj
  and o_proj matrices, with κ up to 7.6e5, go two-sided); rank-deficient or badly conditioned matrices go two-sided
  instead of silently freezing their tail directions (the old cut-off froze those below 1.3e-3·σ_1 on an
  11008-wide layer).
* float32 base under bf16/fp16 autocast: autocast would round the base product to 16 bits before Σ⁻¹, so a one-sided
  adapter computes its layer's forward in float32 with autocast off (the output is cast back to the autocast dtype);
  a two-sided one runs under autocast like a LoRA (no Σ⁻¹, so no amplification).
* float64: one-sided.

The trade-off on a 16-bit base (`benchmarks/svf_svft_step.py --dtype bfloat16`, figures in
`benchmarks/RESULTS.md`): the second side costs (m + n)·p − p² more frozen values per matrix and buys an update at
the bf16 rounding floor, where the one-sided route through Σ⁻¹ loses a large share of it on the worst-conditioned
matrices (and the official dense rebuild, which rounds W' to 16 bits, loses some too); both factored routes are far
cheaper per step than the rebuild. On float32 bases, where Σ⁻¹ is safe, the one-sided form keeps its memory win.

Off-diagonal patterns (banded, random, top_k) couple u_i with v_j for i ≠ j, so they depend on the sign and order
of each recomputed singular pair (plain is immune: m_ii u_i v_iᵀ does not change when a pair flips). The support
(row and column indices) is saved; so is `basis_check`, U's projections on two fixed pseudo-random vectors. At
load, a pair whose recomputed projections have the opposite sign is flipped back, and any other mismatch (near-equal
singular values swapped or rotated by another BLAS) is refused with an error rather than a silently different
adapter.
Cost over the frozen layer, one-sided: p² frozen values and 2·T·p² multiply-adds for T tokens; two-sided:
(m + n)·p values and T·p·(m + n) multiply-adds. benchmarks/svf_svft_step.py measures both against LoRA and against
rebuilding W' every step (the official code's way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import weight_matrix
from ..linalg import SVD, Factorizer, factor_dtype
from .spectral import SpectralAdapter

PATTERNS = ("plain", "banded", "random", "top_k")
INITS = ("zero", "kaiming")
DEFAULT_D = 2  # the paper's smallest banded/random variant, SVFT^{B,R}_{d=2}
SIGMA_INVERSE_LIMIT = 1e-3  # largest u·κ for which the update may pass a rounded value through Σ⁻¹ (one-sided)
CHECK_TOLERANCE = 1e-3  # how far a recomputed basis_check may move (its entries are N(0, 1)-sized)
CHECK_SEED = 1234  # seed of the two probe vectors behind basis_check


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
        """|Ω| = p(2d+1) − d(d+1): the banded count (d off-diagonals per side), shared by random and top_k."""
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


def sigma_inverse_is_safe(S: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """True when routing the update through Σ⁻¹ amplifies the rounding of a `weight_dtype` product acceptably:
    u·σ_1/σ_p <= SIGMA_INVERSE_LIMIT (module docstring). Never on a 16-bit base, whose adapter tensors are float32
    while its products are not."""
    if weight_dtype in (torch.bfloat16, torch.float16):
        return False
    u = torch.finfo(weight_dtype).eps / 2
    return bool(S[-1] > 0) and u * float(S[0] / S[-1]) <= SIGMA_INVERSE_LIMIT


def basis_check(U: torch.Tensor) -> torch.Tensor:
    """(p, 2): the columns of U projected on two fixed pseudo-random vectors; a sign flip of a singular pair flips
    its row, a swap or rotation of near-equal pairs changes it."""
    probes = torch.randn(U.shape[0], 2, generator=torch.Generator().manual_seed(CHECK_SEED), dtype=torch.float64)
    return (U.T.double() @ probes.to(U.device)).float()


def aligned_to(triplets: SVD, saved: torch.Tensor, where: str) -> SVD:
    """`triplets` with every pair whose check has the opposite sign flipped back; ValueError on any other mismatch."""
    U, S, Vh = triplets
    p = saved.shape[0]
    found = basis_check(U[:, :p]).to(saved.device)
    strongest = saved.abs().argmax(dim=1, keepdim=True)  # the probe each pair's sign is read from
    signs = torch.sign(found.gather(1, strongest) * saved.gather(1, strongest)).squeeze(1)
    signs[signs == 0] = 1
    mismatch = (found * signs[:, None] - saved).abs().amax(dim=1) > CHECK_TOLERANCE
    if bool(mismatch.any()):
        i = int(mismatch.nonzero()[0])
        raise ValueError(f"{where}: the singular basis recomputed from the base weight does not match the one this "
                         f"SVFT adapter was trained with (singular pair {i} of {p} differs, σ = {float(S[i]):.6g}; "
                         "near-equal singular values come out swapped or rotated on another device or BLAS). The "
                         "off-diagonal pattern would mix other directions: load it where it was trained, or use "
                         "pattern='plain', which does not depend on the basis' signs and order")
    signs = signs.to(U.dtype).to(U.device)
    k = signs.numel()
    return SVD(torch.cat([U[:, :k] * signs, U[:, k:]], dim=1), S, torch.cat([Vh[:k] * signs[:, None], Vh[k:]]))


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
        if cfg.pattern != "plain":
            self.register_buffer("basis_check", basis_check(triplets.U[:, :p]).to(W.device))
        self.set_basis(triplets, W.dtype)
        self.register_buffer("rows", rows.to(W.device))
        self.register_buffer("cols", cols.to(W.device))
        k = rows.numel()
        std = math.sqrt(2.0 / k) if cfg.init == "kaiming" else 0.0
        if cfg.gate:  # parameters in name order, as a load restores them: optimizer state is matched by position
            self.gate = nn.Parameter(torch.zeros((), dtype=W.dtype, device=W.device))
        self.m = nn.Parameter(torch.randn(k, dtype=W.dtype, device=W.device) * std)

    def rebuild(self, W: torch.Tensor, factors: Factorizer) -> None:
        triplets = factors.svd(W, dtype=factor_dtype(self.config.factor_dtype))
        saved = getattr(self, "basis_check", None)  # None: plain, or an adapter saved before the check existed
        if saved is not None:
            triplets = aligned_to(triplets, saved, f"{self.shape[0]}x{self.shape[1]} weight")
        self.set_basis(triplets, W.dtype)

    def set_basis(self, triplets: SVD, dtype: torch.dtype) -> None:
        """One side of the basis when Σ⁻¹ is safe for the base's dtype, both sides otherwise (module docstring)."""
        p = self.basis_rank(triplets.U.shape[0], triplets.Vh.shape[1])
        self.two_sided = not sigma_inverse_is_safe(triplets.S[:p], weight_matrix(self.base).dtype)
        if not self.two_sided:
            return super().set_basis(triplets, dtype)
        self.register_buffer("U", triplets.U[:, :p].to(dtype).contiguous(), persistent=False)
        self.register_buffer("Vh", triplets.Vh[:p].to(dtype).contiguous(), persistent=False)
        self.register_buffer("S", triplets.S[:p].to(dtype), persistent=False)

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

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """g·M h on the last axis: an element-wise product for the diagonal (plain), else a product with M made dense
        (p x p). The dense product saves only h for the backward, where a gather of the |Ω| needed columns and a
        scatter-add would save 2d+1 times as much; on SmolLM2-135M at 4x128 tokens that took SVFT's peak training
        memory from 2.04x LoRA's to 1.26x for the same step time (benchmarks/svf_svft_step.py)."""
        if self.config.pattern == "plain":  # Ω is the diagonal, rows = cols = 0..p-1 in order
            return h * self.values().to(h.dtype)
        return h @ self.dense_m().to(h.dtype).T

    def coordinate_map(self, c: torch.Tensor) -> torch.Tensor:
        inverse = (1 / self.S).to(c.dtype)  # one-sided only where σ_p is far from 0 (sigma_inverse_is_safe)
        return self.mix(c * inverse) if self.output_side else self.mix(c) * inverse

    def triplets(self) -> SVD:
        return SVD(self.U, self.S, self.Vh) if self.two_sided else super().triplets()

    def delta(self) -> torch.Tensor:
        if not self.two_sided:
            return super().delta()
        return self.U @ self.mix(self.Vh.T).T  # U·(g·M·Vᵀ), g·M applied to the coordinates of every column of Vᵀ

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if self.two_sided:  # U·g·M·Vᵀ x in the basis' float32 (or autocast's 16 bits: no Σ⁻¹, nothing amplified)
            out = self.base(x)
            h = F.linear(x.to(self.Vh.dtype), self.Vh)
            return out + F.linear(self.mix(h), self.U).to(out.dtype)
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().adapted(x)
        with torch.autocast(device, enabled=False):  # a 16-bit base product would be amplified by Σ⁻¹
            out = super().adapted(x.to(self.basis.dtype))
        return out.to(torch.get_autocast_dtype(device))
