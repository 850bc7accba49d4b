"""LoRA and its SVD/QR-initialised relatives, side by side: the same parameters, four inits.

All four compute y = x W^T + s (x A^T) B^T with A: r x n, B: m x r trainable and s = alpha/r (rsLoRA: alpha/sqrt r).
Trainable parameters per m x n matrix: r (m + n).

* LoRA   (Hu et al., arXiv 2106.09685): B = 0, A ~ kaiming-uniform(a=sqrt 5), so ΔW = s B A starts at 0.
* PiSSA  (Meng et al., arXiv 2404.02948): B0 = U_r diag(sqrt(S_r/s)), A0 = diag(sqrt(S_r/s)) Vh_r from the top-r
  SVD of W; the frozen part is the residual W - s B0 A0 = U[:, r:] S[r:] Vh[r:].
* MiLoRA (Wang et al., arXiv 2406.09044): the same with the bottom-r triplets; needs the exact SVD.
* OLoRA  (Büyükakyüz, arXiv 2406.01775): B0 = Q[:, :r], A0 = R[:r] from W = QR, s not divided out (as PEFT does).

The three residual methods start from B = B0, A = A0 and keep the frozen residual implicit (see `core`):
ΔW = s (B A - B0 A0) relative to the original W, exactly a rank-2r LoRA [B | -B0] [A ; A0] with the same scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import LowRank, LowRankAdapter, owned, require_rank_below
from ..linalg import Factorizer, factor_dtype


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of the update; must be below min(out, in) of every adapted matrix
    alpha: float | None = None  # scale numerator; None means alpha = r, i.e. scale 1 (PiSSA's and PEFT's default)
    rslora: bool = False  # scale = alpha / sqrt(r) (rsLoRA, arXiv 2312.03732) instead of alpha / r
    dropout: float = 0.0  # dropout on the adapter path's input (PiSSA recommends 0)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for alpha = r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


@dataclass(frozen=True)
class SVDInitConfig(LoRAConfig):
    factor_dtype: str = "float32"  # precision of the SVD/QR: "float32" or "float64"

    def __post_init__(self) -> None:
        super().__post_init__()
        factor_dtype(self.factor_dtype)


@dataclass(frozen=True)
class PiSSAConfig(SVDInitConfig):
    niter: int | None = None  # None: exact SVD; K >= 0: randomized SVD with K power iterations (fast, approximate)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.niter is not None and (not isinstance(self.niter, int) or self.niter < 0):
            raise ValueError(f"niter must be None (exact SVD) or an integer >= 0, got {self.niter!r}")


class LoRA(LowRankAdapter):
    name = "lora"
    Config = LoRAConfig
    paper = "LoRA, Hu et al. 2021, arXiv 2106.09685"
    delta_formula = "ΔW = s·B·A, B = 0 and A ~ kaiming-uniform at init"
    params_formula = "r·(m + n)"

    @classmethod
    def count_trainable(cls, m: int, n: int, config: LoRAConfig) -> int:
        return config.r * (m + n)

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        require_rank_below(self.config.r, W)
        m, n = W.shape
        self.A = nn.Parameter(torch.empty(self.config.r, n, dtype=W.dtype, device=W.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default, as loralib and PEFT
        self.B = nn.Parameter(torch.zeros(m, self.config.r, dtype=W.dtype, device=W.device))

    def delta(self) -> torch.Tensor:
        return self.config.scale * (self.B @ self.A)

    def low_rank(self) -> LowRank:
        return LowRank(self.B, self.A, self.config.scale)


class ResidualLoRA(LoRA):
    """LoRA started from frozen initial factors (B0, A0) taken out of W; subclasses choose the factors."""

    def initial_factors(self, W: torch.Tensor, factors: Factorizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(B0: m x r, A0: r x n) in the factorisation dtype."""
        raise NotImplementedError

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        require_rank_below(self.config.r, W)
        B0, A0 = (owned(t, W.dtype) for t in self.initial_factors(W, factors))
        self.A = nn.Parameter(A0.clone())
        self.B = nn.Parameter(B0.clone())
        self.register_buffer("A0", A0)
        self.register_buffer("B0", B0)

    def delta(self) -> torch.Tensor:
        return self.config.scale * (self.B @ self.A - self.B0 @ self.A0)

    def low_rank(self) -> LowRank:
        return LowRank(torch.cat([self.B, -self.B0], dim=1), torch.cat([self.A, self.A0]), self.config.scale)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_rate()
        if not p:  # one rank-2r product (`low_rank`) reads x once: about the cost of a rank-r LoRA path
            return super().adapted(x)
        out = self.base(x)  # dropout may only touch the trainable half
        x = x.to(self.A.dtype)
        path = F.linear(F.linear(F.dropout(x, p), self.A), self.B) - F.linear(F.linear(x, self.A0), self.B0)
        return out + (self.config.scale * path).to(out.dtype)


def _split_singular(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """B0 = U diag(sqrt(S/s)), A0 = diag(sqrt(S/s)) Vh, so that s B0 A0 = U diag(S) Vh."""
    root = torch.sqrt(S / scale)
    return U * root, root[:, None] * Vh


class PiSSA(ResidualLoRA):
    name = "pissa"
    Config = PiSSAConfig
    paper = "PiSSA, Meng et al. 2024, arXiv 2404.02948"
    delta_formula = "ΔW = s·(B·A − B0·A0), s·B0·A0 = top-r SVD part of W"
    params_formula = "r·(m + n)"

    def initial_factors(self, W: torch.Tensor, factors: Factorizer) -> tuple[torch.Tensor, torch.Tensor]:
        top = factors.top_svd(W, self.config.r, niter=self.config.niter, dtype=factor_dtype(self.config.factor_dtype))
        return _split_singular(*top, self.config.scale)


class MiLoRA(ResidualLoRA):
    name = "milora"
    Config = SVDInitConfig
    paper = "MiLoRA, Wang et al. 2024, arXiv 2406.09044"
    delta_formula = "ΔW = s·(B·A − B0·A0), s·B0·A0 = bottom-r SVD part of W"
    params_formula = "r·(m + n)"

    def initial_factors(self, W: torch.Tensor, factors: Factorizer) -> tuple[torch.Tensor, torch.Tensor]:
        U, S, Vh = factors.svd(W, dtype=factor_dtype(self.config.factor_dtype))  # exact: the bottom needs all of it
        r = self.config.r
        return _split_singular(U[:, -r:], S[-r:], Vh[-r:], self.config.scale)


class OLoRA(ResidualLoRA):
    name = "olora"
    Config = SVDInitConfig
    paper = "OLoRA, Büyükakyüz 2024, arXiv 2406.01775"
    delta_formula = "ΔW = s·(B·A − B0·A0), B0 = Q[:, :r], A0 = R[:r] from W = Q·R"
    params_formula = "r·(m + n)"

    def initial_factors(self, W: torch.Tensor, factors: Factorizer) -> tuple[torch.Tensor, torch.Tensor]:
        Q, R = factors.qr(W, dtype=factor_dtype(self.config.factor_dtype))
        r = self.config.r
        return Q[:, :r], R[:r]
