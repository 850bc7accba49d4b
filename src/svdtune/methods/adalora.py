"""AdaLoRA and LoRA²: an SVD-shaped update P Λ Q whose singular values Λ are pruned to a budget during training.

* AdaLoRA (Zhang et al., arXiv 2303.10512):  ΔW = s · P diag(λ ⊙ mask) Q,   P: m x r, λ: r, Q: r x n,
  s = alpha / r with r the initial rank (fixed, as the paper's code divides by the initial rank). Init: λ = 0,
  P, Q ~ N(0, 0.02²), so ΔW = 0. Trainable per m x n matrix: r (m + n) + r. Regulariser:
  orth_reg · (||PᵀP − I||_F + ||Q Qᵀ − I||_F) / 2, so P and Q stay close to singular vectors and λ to singular
  values. The division by the number of factors is PEFT's and the paper code's normalisation: they average
  ||G − I||_F over every factor tensor of the model (lora_A and lora_B of each matrix), and `core.regularisation`
  averages these per-matrix means over matrices, which is the same number. So an `orth_reg` (PEFT's
  `orth_reg_weight`) taken from a paper or a PEFT config means the same here.
* LoRA² (Zhang et al., arXiv 2408.06854): P and Q are themselves low-rank, each a small LoRA of inner rank k:
  Q = B A (B: r x k, A: k x n), P = bb aa (bb: m x k, aa: k x r), so ΔW = s · (bb aa) diag(λ ⊙ mask) (B A).
  Trainable: k (m + n) + 2 r k + r. Regulariser: orth_reg · the mean per-factor ||G − I||_F over A, B, aa, bb
  (the same normalisation as AdaLoRA's, one term per factor tensor) plus cross_reg · ||aa B||_F, the mutual
  orthogonality of the two planes. The planes are the k-dim subspaces of the
  r-dim singular-value space that the two LoRAs occupy: the column space of B (where Q = B A lives) and the row space
  of aa (where P = bb aa lives). The paper's intended term ||(Aᵀ Bᵀ)(aaᵀ bbᵀ)||_F = ||Aᵀ (aa B)ᵀ bbᵀ||_F equals
  ||aa B||_F whenever A and bb are orthonormal (which the per-factor terms enforce), and is zero exactly when the
  planes are orthogonal; we penalise the small k x k product, not the m x n one (whose code also had bugs: detached
  copies, ||cov − I|| in place of the product). The planes can only be orthogonal when r >= 2k: with B's columns
  and aa's rows orthonormal, ||aa B||_F >= sqrt(2k − r), so at the code's r = k = 8 the cross term is sqrt(k) while
  the per-factor terms are zero, and the two penalties pull against each other. Hence k defaults to r // 2 (k = 4
  at the default r = 8: the paper's two orthogonal planes, as large as they can be), and the config refuses
  2k > r while cross_reg > 0 (set cross_reg=0 to run the code's r = k without the cross term).
  Init: the four small factors semi-orthogonal, λ = 0 (ΔW = 0). The code's N(0, 0.02²) for all four
  (`orthonormal_init=False`) makes ΔW's response to λ a product of four 0.02-scale factors, ~1e-5 of AdaLoRA's:
  one step at a LoRA-like rate does not move a float32 loss.

Pruning: `svdtune.allocate.RankAllocator` scores every triplet i by sensitivity x uncertainty and masks the lowest.
AdaLoRA scores λ_i, row i of Q and column i of P; LoRA² only λ_i, row i of B (r x k) and column i of aa (k x r), the
small factors: for a 768 x 768 layer at r = k = 8 that is 136 entries instead of 12,296 (the paper's ~98.5% saving).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core import LowRank, require_rank_below
from ..linalg import Factorizer
from .lora import LoRAConfig
from .masked import MaskedRank, mean_orthogonality

INIT_STD = 0.02  # P, Q (and LoRA²'s four small factors) ~ N(0, 0.02²), as both papers' code


@dataclass(frozen=True)
class AdaLoRAConfig(LoRAConfig):
    orth_reg: float = 0.1  # weight of the orthogonality regulariser (mean over matrices, added to the loss)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.orth_reg >= 0:
            raise ValueError(f"orth_reg must be >= 0, got {self.orth_reg!r}")


@dataclass(frozen=True)
class LoRA2Config(AdaLoRAConfig):
    k: int | None = None  # inner rank of the two small LoRAs that make P and Q; None: r // 2 (orthogonal planes fit)
    cross_reg: float = 0.1  # weight of the plane-orthogonality term ||aa B||_F
    orthonormal_init: bool = True  # A, B, aa, bb start semi-orthogonal (random QR); False: the code's N(0, 0.02²)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is None:
            object.__setattr__(self, "k", self.r // 2)  # stored resolved, so a saved config says what ran
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r} (k defaults to r // 2, which needs r >= 2)")
        if not self.cross_reg >= 0:
            raise ValueError(f"cross_reg must be >= 0, got {self.cross_reg!r}")
        if self.cross_reg > 0 and 2 * self.k > self.r:
            raise ValueError(f"two planes of rank k={self.k} cannot be orthogonal in r={self.r} dimensions, so the "
                             f"cross term (cross_reg={self.cross_reg}) can never reach zero; use k <= r // 2 = "
                             f"{self.r // 2}, or cross_reg=0")


def _normal(*shape: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, dtype=like.dtype, device=like.device) * INIT_STD)


def _semi_orthogonal(rows: int, cols: int, *, like: torch.Tensor) -> nn.Parameter:
    """Orthonormal rows (wide) or columns (tall), from the QR of a Gaussian matrix: where the regulariser is zero."""
    Q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64))[0]
    return nn.Parameter((Q if rows >= cols else Q.T).to(like.dtype).to(like.device).contiguous())


class AdaLoRA(MaskedRank):
    name = "adalora"
    Config = AdaLoRAConfig
    paper = "AdaLoRA, Zhang et al. 2023, arXiv 2303.10512"
    delta_formula = "ΔW = s·P·diag(λ⊙mask)·Q, λ = 0 at init, lowest-importance λ pruned to a budget"
    params_formula = "r·(m + n) + r"
    scored = (("E", 0), ("Q", 0), ("P", 1))

    @classmethod
    def count_active(cls, m: int, n: int, config: AdaLoRAConfig, rank: int) -> int:
        return rank * (m + n + 1)

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        require_rank_below(self.config.r, W)
        m, n = W.shape
        r = self.config.r
        # parameters in name order, as a load restores them: optimizer state is matched by position
        self.E, self.P, self.Q = nn.Parameter(torch.zeros_like(W[0, :r])), _normal(m, r, like=W), _normal(r, n, like=W)
        self.register_mask(r, W.device)

    def singular_values(self) -> torch.Tensor:
        """λ ⊙ mask: the pruned triplets contribute nothing."""
        return self.E * self.mask

    def delta(self) -> torch.Tensor:
        return self.config.scale * (self.P * self.singular_values()) @ self.Q

    def low_rank(self) -> LowRank:
        keep = self.kept()
        return LowRank(self.P[:, keep] * self.singular_values()[keep], self.Q[keep], self.config.scale)

    def extra_loss(self) -> torch.Tensor:
        return self.config.orth_reg * mean_orthogonality(self.P, self.Q)

    def path(self) -> LowRank:
        return LowRank(self.P, self.singular_values()[:, None] * self.Q, self.config.scale)  # all slots: static shapes


class LoRA2(AdaLoRA):
    name = "lora2"
    Config = LoRA2Config
    paper = "LoRA², Zhang et al. 2024, arXiv 2408.06854"
    delta_formula = "ΔW = s·(bb·aa)·diag(λ⊙mask)·(B·A): AdaLoRA with P and Q each a rank-k LoRA"
    params_formula = "k·(m + n) + 2·r·k + r"
    scored = (("E", 0), ("B", 0), ("aa", 1))

    @classmethod
    def count_active(cls, m: int, n: int, config: LoRA2Config, rank: int) -> int:
        return config.k * (m + n) + 2 * rank * config.k + rank

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        require_rank_below(self.config.r, W)
        require_rank_below(self.config.k, W)
        m, n = W.shape
        r, k = self.config.r, self.config.k
        make = _semi_orthogonal if self.config.orthonormal_init else _normal
        self.A, self.B = make(k, n, like=W), make(r, k, like=W)
        self.E = nn.Parameter(torch.zeros_like(W[0, :r]))
        self.aa, self.bb = make(k, r, like=W), make(m, k, like=W)
        self.register_mask(r, W.device)

    @property
    def P(self) -> torch.Tensor:
        return self.bb @ self.aa

    @property
    def Q(self) -> torch.Tensor:
        return self.B @ self.A

    def low_rank(self) -> LowRank:
        """Rank min(active, k): the active triplets, or, when more than k survive, bb and A around a k x k core."""
        if self.rank <= self.config.k:
            return super().low_rank()
        core = (self.aa * self.singular_values()) @ self.B
        return LowRank(self.bb @ core, self.A, self.config.scale)

    def cross_term(self) -> torch.Tensor:
        """||aa B||_F: zero when the two planes (column space of B, row space of aa) are orthogonal."""
        return torch.linalg.matrix_norm(self.aa @ self.B)

    def extra_loss(self) -> torch.Tensor:
        per_factor = mean_orthogonality(self.A, self.B, self.aa, self.bb)
        return self.config.orth_reg * per_factor + self.config.cross_reg * self.cross_term()

    def path(self) -> LowRank:
        core = (self.aa * self.singular_values()) @ self.B  # k x k: the path is rank k whatever r is
        return LowRank(self.bb, core @ self.A, self.config.scale)
