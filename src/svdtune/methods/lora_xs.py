"""LoRA-XS (Bałazy et al., arXiv 2405.17604): LoRA between frozen singular vectors, only an r x r matrix trains.

    ΔW = s · U_r R (Σ_r V_r^T),   U_r: m x r and Σ_r V_r^T: r x n frozen from the top-r SVD of W,  R: r x r trainable

Trainable parameters per matrix: r², independent of m and n. The base weight is not modified. R starts from
N(0, init_std²) with the paper's init_std = 1e-5, so ΔW is tiny but not zero at init; init_std = 0 gives an exactly
function-preserving start and still trains, because ∂L/∂R = s U_r^T G (Σ_r V_r^T X)^T does not vanish at R = 0.
The frozen factors are saved with the adapter: recomputing an SVD is not bitwise reproducible across devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core import LowRank, LowRankAdapter, owned, require_rank_below
from ..linalg import Factorizer, factor_dtype
from .lora import PiSSAConfig


@dataclass(frozen=True)
class LoRAXSConfig(PiSSAConfig):
    init_std: float = 1e-5  # std of R at init (the paper's); 0 starts exactly at ΔW = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")


class LoRAXS(LowRankAdapter):
    name = "lora_xs"
    Config = LoRAXSConfig
    paper = "LoRA-XS, Bałazy et al. 2024, arXiv 2405.17604"
    delta_formula = "ΔW = s·U_r·R·Σ_r·V_rᵀ, only R (r×r) trains"
    params_formula = "r²"

    @classmethod
    def count_trainable(cls, m: int, n: int, config: LoRAXSConfig) -> int:
        return config.r * config.r

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        r = self.config.r
        require_rank_below(r, W)
        U, S, Vh = factors.top_svd(W, r, niter=self.config.niter, dtype=factor_dtype(self.config.factor_dtype))
        self.register_buffer("U", owned(U, W.dtype))
        self.register_buffer("SVh", owned(S[:, None] * Vh, W.dtype))
        self.R = nn.Parameter(torch.randn(r, r, dtype=W.dtype, device=W.device) * self.config.init_std)

    def delta(self) -> torch.Tensor:
        return self.config.scale * (self.U @ self.R @ self.SVh)

    def low_rank(self) -> LowRank:
        return LowRank(self.U, self.R @ self.SVh, self.config.scale)

