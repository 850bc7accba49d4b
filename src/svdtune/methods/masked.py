"""What the adaptive-rank methods (AdaLoRA, LoRA², ALoRA) share: r_max rank slots and a boolean mask over them.

Shapes never change while ranks are pruned or reallocated: a method allocates r_max slots once and multiplies its
per-slot scale (AdaLoRA's Λ, ALoRA's gate) by `mask`. So the optimizer's state keeps its shapes and a compiled graph
does not recompile; `svdtune.allocate.RankAllocator` decides the masks. The mask is a saved buffer: it goes into the
adapter file and comes back bit-exactly. Exports (`low_rank()`) keep only the active slots, so each module exports at
the rank that survived.

Also here: the orthogonality penalty both SVD-form methods use, ||G − I||_F with G the Gram matrix on the smaller
side of the factor (X Xᵀ for a wide X, Xᵀ X for a tall one): zero exactly when the factor is semi-orthogonal.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..core import LowRankAdapter


class MaskedRank(LowRankAdapter):
    """An adapter with r_max rank slots, of which `mask` marks the active ones."""

    # (tensor name, axis that indexes the rank slots): the tensors whose sensitivity scores each slot (AdaLoRA, LoRA²)
    scored: ClassVar[tuple[tuple[str, int], ...]] = ()
    # True: slots are scored by ablation on held-out data instead (ALoRA)
    ablation: ClassVar[bool] = False
    # (tensor name, axis that indexes the rank slots) of the trainable tensors that hold one slice per slot: what a
    # reallocation resets, optimizer state included, when it reopens a slot (ALoRA)
    slot_tensors: ClassVar[tuple[tuple[str, int], ...]] = ()

    @classmethod
    def count_active(cls, m: int, n: int, config: Any, rank: int) -> int:
        """Trainable parameters that carry the update when `rank` slots are active (what pruning leaves)."""
        raise NotImplementedError

    @classmethod
    def count_trainable(cls, m: int, n: int, config: Any) -> int:
        return cls.count_active(m, n, config, cls.slots(config, m, n))

    @classmethod
    def slots(cls, config: Any, m: int, n: int) -> int:
        """r_max: the number of rank slots allocated for an m x n matrix."""
        return config.r

    def register_mask(self, active: int, device: torch.device) -> None:
        mask = torch.zeros(self.slots(self.config, *self.shape), dtype=torch.bool, device=device)
        mask[:active] = True
        self.register_buffer("mask", mask)

    @property
    def rank(self) -> int:
        """Active slots now."""
        return int(self.mask.sum())

    def active_parameters(self) -> int:
        return self.count_active(*self.shape, self.config, self.rank)

    def slot_parameters(self) -> list[tuple[torch.nn.Parameter, int]]:
        """(parameter, slot axis) for each of `slot_tensors`."""
        return [(getattr(self, name), axis) for name, axis in self.slot_tensors]

    def gate_values(self) -> torch.Tensor:
        """The mask as numbers in the trainable factors' dtype: the gates an ablation starts from."""
        return self.mask.to(self.slot_parameters()[0][0].dtype)

    def kept(self) -> torch.Tensor:
        """Indices of the active slots; at least one (its factor is zero when all are pruned), since PEFT and the
        export need rank >= 1."""
        keep = self.mask.nonzero().flatten()
        return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=self.mask.device)


def orthogonality(X: torch.Tensor) -> torch.Tensor:
    """||G − I||_F for the Gram matrix G of X on its smaller side: 0 iff X has orthonormal rows (wide) or columns."""
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
    return torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device))


def mean_orthogonality(*factors: torch.Tensor) -> torch.Tensor:
    """The mean of `orthogonality` over `factors`: PEFT's AdaLoRA normalisation, one term per factor tensor."""
    return sum(orthogonality(X) for X in factors) / len(factors)
