"""The singular basis SVF and SVFT share: an update that acts on the singular coordinates of a frozen W.

SVF scales W's singular values, SVFT mixes them with a sparse matrix: both are ΔW = U·K·Σ·Vᵀ for an operator K on
singular coordinates, and both are computed here from one side of the basis and W itself. Since U Σ Vᵀ = W on the
top singular triplets, ΔW = U K Uᵀ W, so the forward is y' = y + U K Uᵀ (y − b) on the output side or, when the input
side is the smaller one, y' = W (x + V Σ⁻¹KΣ Vᵀ x) + b. The kept side is square (p x p, p = min(m, n)), a
non-persistent buffer in the adapter's dtype next to the untouched W, recomputed from the base at load (the base
fingerprint check guarantees the same weights, and the factor cache makes it cheap). The trade-off, per m x n matrix
and T tokens (`benchmarks/svf_svft_step.py` measures it):

* kept W + one-sided square basis (chosen): p² extra frozen values and 2·T·p² extra multiply-adds per pass. On
  SmolLM2-135M (all 7 projections) that is +207 MB in float32. Exact, function-preserving, no dense W' ever built.
* kept W + both U and V (y = x Wᵀ + ((x V) ⊙ d) Uᵀ, the obvious factored form): (m + n)·p extra values, +632 MB on
  SmolLM2-135M (3x the one-sided basis) and T·p·(m + n) multiply-adds.
* the official dense rebuild (W' = U diag(S c z) Vᵀ every step): m·n·p multiply-adds per matrix per step, plus a
  dense W' and its gradient per matrix in memory.
* W replaced by its factors (y = ((x V) ⊙ S c z) Uᵀ): the base would no longer be the user's weight (not bit-exact at
  init, `unload` not exact), so it is not offered.
"""

from __future__ import annotations

import torch

from ..core import Adapter, weight_matrix
from ..linalg import SVD, Factorizer, factor_dtype


class SpectralAdapter(Adapter):
    """Shared by SVF and SVFT: ΔW = U·K·Σ·Vᵀ over the top-k singular triplets of W (K a k x k operator on singular
    coordinates: SVF's diag(c·z − 1), SVFT's M Σ⁻¹), computed from one side of the basis and W itself:

        output side (m <= n, keeps U):  ΔW x = U K Uᵀ (W x),             c = Uᵀ (y − b),  y' = y + U·K c
        input side  (m > n,  keeps V):  ΔW x = W V (Σ⁻¹ K Σ) Vᵀ x,       c = Vᵀ x,        y' = W (x + V·Σ⁻¹KΣ c) + b

    because U Σ = W V and Σ Vᵀ = Uᵀ W hold exactly on the top-k triplets. The kept side, `basis`, is min(m, n) x k:
    square for a full basis, a third of U and V together on SmolLM2's matrices. A subclass defines `coordinate_map`
    (c ↦ K c on the output side, c ↦ Σ⁻¹KΣ c on the input side, on the last axis).

    `basis` and S are non-persistent buffers in the adapter's dtype (float32 on a 16-bit base): recomputing them at
    load is safe because loading checks that the base weight is bit-identical to the one the adapter was trained on
    (and cheap with the cache).
    """

    def basis_rank(self, m: int, n: int) -> int:
        """How many singular triplets the update spans (all min(m, n) unless a method truncates)."""
        return min(m, n)

    @property
    def output_side(self) -> bool:
        """True when the update acts on the layer's output (m <= n, U kept), False on its input (V kept)."""
        m, n = self.shape
        return m <= n

    def rebuild(self, W: torch.Tensor, factors: Factorizer) -> None:
        self.set_basis(factors.svd(W, dtype=factor_dtype(self.config.factor_dtype)), W.dtype)

    def set_basis(self, triplets: SVD, dtype: torch.dtype) -> None:
        """Keep the smaller side of the top-k singular vectors and the singular values, in `dtype`."""
        U, S, Vh = triplets
        k = self.basis_rank(U.shape[0], Vh.shape[1])
        basis = U[:, :k] if self.output_side else Vh[:k].T
        self.register_buffer("basis", basis.to(dtype).contiguous(), persistent=False)
        self.register_buffer("S", S[:k].to(dtype), persistent=False)

    def coordinate_map(self, c: torch.Tensor) -> torch.Tensor:
        """K c (output side) or Σ⁻¹KΣ c (input side) for singular coordinates c (..., k), in c's dtype."""
        raise NotImplementedError

    def triplets(self) -> SVD:
        """The top-k singular triplets (U, S, Vh) of W, the missing side recovered from W (U = W V Σ⁻¹ or
        Vh = Σ⁻¹ Uᵀ W): for inspection and tests; the forward never needs them."""
        W = weight_matrix(self.base).to(self.basis.dtype)
        if self.output_side:
            return SVD(self.basis, self.S, (self.basis.T @ W) / self.S[:, None])
        return SVD((W @ self.basis) / self.S, self.S, self.basis.T)

    def delta(self) -> torch.Tensor:
        W = weight_matrix(self.base).to(self.basis.dtype)
        if self.output_side:  # ΔW = U K Uᵀ W; the map acts on rows, so map the columns of Uᵀ W via its transpose
            return self.basis @ self.coordinate_map(W.T @ self.basis).T
        return W @ self.basis @ self.coordinate_map(self.basis).T  # ΔW = W V (Σ⁻¹KΣ) Vᵀ

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        basis, bias = self.basis, self.base.bias
        if self.output_side:
            out = self.base(x)
            y = out.to(basis.dtype)
            c = y @ basis if bias is None else y @ basis - bias.to(basis.dtype) @ basis
            return out + (self.coordinate_map(c) @ basis.T).to(out.dtype)
        h = x.to(basis.dtype)
        return self.base((h + self.coordinate_map(h @ basis) @ basis.T).to(x.dtype))
