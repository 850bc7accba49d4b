"""ALoRA, Allocating LoRA (Liu et al., arXiv 2403.16187, NAACL 2024): LoRA whose ranks move between modules.

    ΔW = s · B diag(g) A,   A: r_max x n, B: m x r_max, g ∈ {0, 1}^r_max the rank gates (`mask`),  s = alpha / r

Each module starts with its first r of r_max slots open (default r_max = 2r, capped at min(m, n) − 1; A
kaiming-uniform, B = 0, so ΔW = 0). In alternating rounds `svdtune.allocate.RankAllocator` scores every open rank by
ablation on a held-out batch (AB-LoRA), closes the least important ones, and opens the same number of slots in the
modules that need them, so the total rank Σ r_k stays r x #modules. Gates are not trained by gradient. A newly
opened slot starts like a fresh LoRA rank (A row re-drawn, B column zero), so opening it does not change the output.

Trainable parameters per m x n matrix: r_k (m + n) carry the update, for r_k open slots; r_max (m + n) are
allocated, so shapes stay static. The scale stays alpha / r whatever r_k becomes, so a reallocated rank has the same
weight in every module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import LowRank, require_rank_below
from ..linalg import Factorizer
from .lora import LoRAConfig
from .masked import MaskedRank


@dataclass(frozen=True)
class ALoRAConfig(LoRAConfig):
    r_max: int | None = None  # rank slots per matrix, the most one module can receive; None: 2 r (< min(m, n))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r_max is not None and (not isinstance(self.r_max, int) or self.r_max < self.r):
            raise ValueError(f"r_max must be an integer >= r = {self.r} (or None for 2 r), got {self.r_max!r}")


class ALoRA(MaskedRank):
    name = "alora"
    Config = ALoRAConfig
    paper = "ALoRA (Allocating LoRA), Liu et al. 2024, arXiv 2403.16187"
    delta_formula = "ΔW = s·B·diag(g)·A, rank gates g moved between modules by ablation importance"
    params_formula = "r_k·(m + n) for the r_k open of r_max slots (Σ r_k = r·#modules)"
    ablation = True
    slot_tensors = (("A", 0), ("B", 1))  # slot j: row j of A, column j of B
    # (replicas, r_max) slot gates that replace the mask while the allocator scores ablations (`replica_gates`)
    gates: torch.Tensor | None = None

    @classmethod
    def slots(cls, config: ALoRAConfig, m: int, n: int) -> int:
        return config.r_max if config.r_max is not None else min(2 * config.r, min(m, n) - 1)

    @classmethod
    def count_active(cls, m: int, n: int, config: ALoRAConfig, rank: int) -> int:
        return rank * (m + n)

    def init(self, W: torch.Tensor, factors: Factorizer) -> None:
        require_rank_below(self.config.r, W)
        m, n = W.shape
        slots = self.slots(self.config, m, n)
        if slots >= min(m, n):
            raise ValueError(f"r_max={slots} must be smaller than min(out, in) = {min(m, n)} for this {m}x{n} weight; "
                             "lower r_max (None picks 2 r, capped below that)")
        self.A = nn.Parameter(torch.empty(slots, n, dtype=W.dtype, device=W.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(m, slots, dtype=W.dtype, device=W.device))
        self.register_mask(self.config.r, W.device)

    @torch.no_grad()
    def open_slot(self, slot: int, generator: torch.Generator) -> None:
        """Open a closed slot as a fresh LoRA rank: A row ~ kaiming-uniform (bound 1/sqrt n), B column 0."""
        bound = 1.0 / math.sqrt(self.A.shape[1])
        row = torch.rand(self.A.shape[1], generator=generator, dtype=torch.float64) * 2 * bound - bound
        self.A[slot] = row.to(self.A.dtype)
        self.B[:, slot] = 0
        self.mask[slot] = True

    def delta(self) -> torch.Tensor:
        return self.config.scale * (self.B * self.mask) @ self.A

    def low_rank(self) -> LowRank:
        keep = self.kept()
        return LowRank(self.B[:, keep] * self.mask[keep], self.A[keep], self.config.scale)

    def path(self) -> LowRank:
        return LowRank(self.B, self.mask[:, None] * self.A, self.config.scale)  # all slots: static shapes

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        return super().adapted(x) if self.gates is None else self.gated_forward(x, self.gates)

    def gated_forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """base(x) + s ((x Aᵀ) ⊙ g_i) Bᵀ for a batch made of `gates.shape[0]` copies of one batch, one after the other
        along the batch dimension, copy i gated by row g_i. So one forward evaluates as many gate settings (ablations)
        as there are copies, and float gates that require grad give ∂loss/∂g. Gating the r-wide intermediate instead
        of A's rows is the same arithmetic as `forward` (a closed slot contributes exact zeros either way)."""
        replicas = gates.shape[0]
        if x.shape[0] % replicas:
            raise ValueError(f"a batch of {x.shape[0]} rows is not {replicas} equal copies (the batch dimension must "
                             "lead)")
        if replicas > 1 and identical_copies(x, gates):  # upstream of every ablation in the batch: compute one copy
            one = self.gated_forward(x[:x.shape[0] // replicas], gates[:1])
            return one.unsqueeze(0).expand(replicas, *one.shape).flatten(0, 1)
        out = self.base(x)
        h = F.linear(x.to(self.A.dtype), self.A)
        per_copy = gates.view(replicas, *([1] * (h.dim() - 1)), gates.shape[1])
        h = (h.unflatten(0, (replicas, -1)) * per_copy).flatten(0, 1)
        return out + (self.config.scale * F.linear(h, self.B)).to(out.dtype)


def identical_copies(x: torch.Tensor, gates: torch.Tensor) -> bool:
    """True when every copy has the same gates and, bit for bit, the same input: a layer that runs before all the
    ablations of a batch. Its copies then share one output, so a batch of ablations late in the model skips most of
    the products before them (checking costs one pass over x, a fraction of the product it may skip)."""
    if not torch.equal(gates[1:], gates[:1].expand_as(gates[1:])):
        return False
    copies = x.unflatten(0, (gates.shape[0], -1))
    return torch.equal(copies[1:], copies[:1].expand_as(copies[1:]))


@contextmanager
def replica_gates(gates: dict[ALoRA, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each given adapter runs `gated_forward` with its (replicas, r_max) gates; on leaving, the
    ordinary forward again. Outside scoring the forward pays one attribute test for this."""
    try:
        for adapter, g in gates.items():
            adapter.gates = g
        yield
    finally:
        for adapter in gates:
            adapter.gates = None
