"""One rank allocator for the adaptive-rank methods, driven by one call per optimizer step.

    allocator = RankAllocator(model, total_steps)       # finds the AdaLoRA / LoRA² / ALoRA adapters
    for step in range(1, total_steps + 1):
        loss.backward(); optimizer.step()
        allocator.step(model, step, optimizer=optimizer) # after the optimizer step, before zero_grad: it reads grads
        optimizer.zero_grad()

`transformers.Trainer` users add `RankAllocationCallback()` to `callbacks=` instead. Adapters without rank slots
(LoRA, PiSSA, SVF...) are ignored; a model with none gets no allocator (`build_allocator` returns None).

Why one object outside the layers: the budget is global (the lowest triplets of the whole model are pruned, not the
lowest per layer), the schedule needs the step count, and layers keep static shapes (r_max slots and a boolean mask,
see `methods.masked`), so optimizer state stays valid and compiled graphs do not recompile.

Sensitivity allocation (AdaLoRA, LoRA²; arXiv 2303.10512 §3): for every entry w of the scored tensors,
I = |w · ∂L/∂w|, Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2) |I − Ī|, s = Ī Ū; a triplet's score is s(λ_i) plus the
mean s over its row / column of each scored factor. The budget b(t) of active triplets follows the cubic schedule

    b(t) = b0                                              t <= t_i
    b(t) = bT + (b0 − bT) (1 − (t − t_i) / (T − t_i − t_f))³  t_i < t <= T − t_f   (rounded down)
    b(t) = bT                                              t > T − t_f

and at every step t_i < t < T − t_f with t % ΔT == 0, and once at t = T − t_f (to bT), the lowest-scoring active
triplets are masked so that exactly b(t) stay active; importance is updated at every step t < T − t_f. That is
PEFT's AdaLoRA schedule (`budget_schedule`, `update_and_allocate`), so a PEFT config's tinit, tfinal and deltaT mean
the same here; t counts optimizer steps from 1. A masked triplet gets no gradient, so its importance can only decay:
masks only shrink, like b(t).

Ablation allocation (ALoRA, arXiv 2403.16187): in `rounds` rounds spread over (t_i, T − t_f], every open rank j of
module k is scored on a held-out batch with S = −loss:
IS(j) = [S(M) − S(M without j)] + [S(M with only j open in k) − S(M with nothing open in k)],
the second bracket being the paper's S(M_j) measured from the module's empty baseline, so that a closed rank scores
exactly 0. The `move_fraction` · budget lowest open ranks are closed and as many slots are opened in other modules,
first those that lost none this round, most important first: Σ r_k never changes.

A reopened slot must train like a fresh rank. Zeroing its Adam moments is not enough: Adam divides the moments by
the bias corrections 1 − β1^t and √(1 − β2^t) of the tensor's global step count t, where a fresh rank reopened at
step s would use t − s. With β = (0.9, 0.999) the reopened slot's steps come out 3.2x a fresh Adam's at first, about
6x ten steps later and still 3x after a hundred. `FreshSlots` records s for every reopened slot and, after each
optimizer step, replaces that slot's update by the one with its own corrections, so the slot follows exactly the
steps of an Adam started at s. This needs torch's Adam or AdamW (without amsgrad); other optimizers
only get their state zeroed.

A round needs 1 + Σ_k (1 + 2 r_k) held-out losses. `ablation="batched"` (the default) computes them exactly and many
per forward: the held-out batch is replicated along the batch dimension and each copy runs with the slot gates of
one ablation (`methods.alora.replica_gates`), the loss taken per copy as the model's own head computes it.
`"sequential"` takes one forward per ablation (for models whose loss cannot be split per copy, and as the reference);
`"first_order"` estimates both brackets by the gate gradient, at the current gates and with every gate closed
(two forwards and backwards; its agreement with the exact scores is measured in `benchmarks/adaptive.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .core import regularisation
from .inject import adapters, split_name
from .methods.alora import replica_gates
from .methods.masked import MaskedRank

ALLOCATOR_FILE = "rank_allocator.safetensors"  # written into each HF Trainer checkpoint by the callback
ABLATIONS = ("batched", "sequential", "first_order")  # how ALoRA's importance is computed (module docstring)


@dataclass(frozen=True)
class AllocationConfig:
    target_rank: float | None = None  # mean active rank per matrix at the end; None: 2/3 of r (AdaLoRA: r0 = 1.5 rT)
    target_total: int | None = None  # or the total number of active triplets at the end (overrides target_rank)
    t_init: int | None = None  # t_i: steps before the first pruning; None: 10% of the steps
    t_final: int | None = None  # t_f: steps at the end with the masks fixed; None: 20% of the steps
    interval: int = 10  # ΔT: steps between two maskings
    beta1: float = 0.85  # EMA factor of the sensitivity Ī
    beta2: float = 0.85  # EMA factor of the uncertainty Ū
    rounds: int = 3  # ALoRA: reallocation rounds
    move_fraction: float = 0.1  # ALoRA: fraction of the total rank closed and reopened elsewhere per round
    seed: int = 0  # ALoRA: draws of the reopened slots' A rows
    ablation: str = "batched"  # ALoRA's scores: "batched" | "sequential" (both exact) | "first_order" (module doc)
    ablation_tokens: int = 2048  # ALoRA "batched": held-out tokens per forward (copies of the batch stacked)

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        for name in ("interval", "rounds", "ablation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("t_init", "t_final", "target_total"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (or None), got {getattr(self, name)}")
        if self.target_rank is not None and not self.target_rank >= 0:
            raise ValueError(f"target_rank must be >= 0 (or None), got {self.target_rank}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.move_fraction < 1:
            raise ValueError(f"move_fraction must be in (0, 1), got {self.move_fraction}")


def budget_at(t: int, *, total: int, b0: int, bT: int, t_init: int, t_final: int) -> int:
    """The cubic budget schedule b(t) (module docstring)."""
    if t <= t_init:
        return b0
    if t > total - t_final:
        return bT
    progress = (t - t_init) / (total - t_init - t_final)
    return int(bT + (b0 - bT) * (1 - progress) ** 3)


def masked_adapters(model: nn.Module) -> dict[str, MaskedRank]:
    return {name: a for name, a in adapters(model).items() if isinstance(a, MaskedRank)}


def ranks(model: nn.Module) -> dict[str, int]:
    """Active rank per adaptive module, by module name."""
    return {name: a.rank for name, a in masked_adapters(model).items()}


class RankAllocator:
    """Budget schedule, importance and masks of every adaptive-rank adapter in a model (module docstring)."""

    def __init__(self, model: nn.Module, total_steps: int, config: AllocationConfig = AllocationConfig(), *,
                 held_out: dict[str, torch.Tensor] | None = None) -> None:
        self.modules = masked_adapters(model)
        if not self.modules:
            raise ValueError("the model has no adaptive-rank adapters (adalora, lora2, alora) to allocate")
        self.config, self.total, self.held_out = config, total_steps, held_out
        self.ablation = any(a.ablation for a in self.modules.values())
        if self.ablation and held_out is None:
            raise ValueError("alora scores its ranks on held-out data: pass held_out=<a batch the model accepts, "
                             "with labels> (RankAllocator, train(..., held_out=...) or RankAllocationCallback)")
        self.t_init = config.t_init if config.t_init is not None else total_steps // 10
        self.t_final = config.t_final if config.t_final is not None else total_steps // 5
        if self.t_init + self.t_final >= total_steps:
            raise ValueError(f"t_init + t_final = {self.t_init} + {self.t_final} must be below the {total_steps} "
                             "training steps: lower them or train longer")
        self.b0 = sum(a.config.r for a in self.modules.values())
        self.bT = self.b0 if self.ablation else self._final_budget()
        self.ema: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.fresh = FreshSlots(self.modules) if self.ablation else None
        self.history: list[tuple[int, torch.Tensor]] = []  # (step, all masks concatenated) after every change

    def _final_budget(self) -> int:
        mean_r = self.b0 / len(self.modules)
        if self.config.target_total is not None:
            bT = self.config.target_total
        else:
            bT = int((self.config.target_rank if self.config.target_rank is not None else 2 * mean_r / 3)
                     * len(self.modules))
        if bT > self.b0:
            raise ValueError(f"the final budget {bT} exceeds the {self.b0} triplets allocated: lower target_rank / "
                             "target_total or raise r")
        return bT

    def budget(self, t: int) -> int:
        return budget_at(t, total=self.total, b0=self.b0, bT=self.bT, t_init=self.t_init, t_final=self.t_final)

    @property
    def active(self) -> int:
        return sum(a.rank for a in self.modules.values())

    def round_steps(self) -> list[int]:
        span = self.total - self.t_final - self.t_init
        return [self.t_init + round(j * span / self.config.rounds) for j in range(1, self.config.rounds + 1)]

    def due(self, step: int) -> bool:
        """Whether step `step` masks to its budget (PEFT's budget_schedule, module docstring)."""
        end = self.total - self.t_final
        return step >= end or (step > self.t_init and step % self.config.interval == 0)

    def step(self, model: nn.Module, step: int, *, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Do what optimizer step `step` (1-based) calls for; True when a mask changed. Call it after
        `optimizer.step()` and before `zero_grad()`; pass the optimizer so reopened ALoRA slots start afresh."""
        if self.ablation:
            if optimizer is not None:
                self.fresh.correct(optimizer)
            changed = step in self.round_steps()
            if changed:
                self.reallocate(model, optimizer)
        else:
            if step < self.total - self.t_final:
                self.update_importance()
            budget = self.budget(step)
            changed = self.due(step) and self.active > budget
            if changed:
                self.mask_to(budget)
        if changed:
            self.history.append((step, torch.cat([a.mask for a in self.modules.values()]).clone()))
        return changed

    # --- sensitivity (AdaLoRA, LoRA²) -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, adapter in self.modules.items():
            for tensor, _ in adapter.scored:
                w = getattr(adapter, tensor)
                if w.grad is None:
                    continue
                ipt = (w * w.grad).abs()
                key = f"{name}/{tensor}"
                if key not in self.ema:
                    self.ema[key] = (torch.zeros_like(ipt), torch.zeros_like(ipt))
                avg, unc = self.ema[key]
                avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
                unc.mul_(beta2).add_((ipt - avg).abs_(), alpha=1 - beta2)

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores per module (r_max each); masked triplets score -inf, so they are never reopened."""
        out = {}
        for name, adapter in self.modules.items():
            score = torch.zeros(adapter.mask.shape, dtype=torch.float64, device=adapter.mask.device)
            for tensor, axis in adapter.scored:
                if f"{name}/{tensor}" in self.ema:
                    avg, unc = self.ema[f"{name}/{tensor}"]
                    s = avg * unc
                    score += (s if s.dim() == 1 else s.mean(dim=1 - axis)).double()
            out[name] = score.masked_fill(~adapter.mask, float("-inf"))
        return out

    @torch.no_grad()
    def mask_to(self, budget: int) -> None:
        """Keep the `budget` highest-scoring triplets of the whole model active, mask the rest."""
        scores = self.scores()
        flat = torch.cat([s.cpu() for s in scores.values()])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
        start = 0
        for adapter in self.modules.values():
            size = adapter.mask.numel()
            adapter.mask.copy_(keep[start:start + size])
            start += size

    # --- ablation (ALoRA) --------------------------------------------------------------------------------------------
    def held_out_loss(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in self.held_out.items()}).loss

    @torch.no_grad()
    def held_out_score(self, model: nn.Module) -> float:
        """S = −loss of the model on the held-out batch."""
        return -float(self.held_out_loss(model))

    @torch.no_grad()
    def slot_importance(self, model: nn.Module, adapter: MaskedRank, slot: int, full: float, empty: float) -> float:
        """IS(slot) for one module, given S of the model as it is (`full`) and with the module closed (`empty`)."""
        mask = adapter.mask.clone()
        adapter.mask[slot] = False
        without = self.held_out_score(model)
        adapter.mask.zero_()
        adapter.mask[slot] = mask[slot]
        alone = self.held_out_score(model)
        adapter.mask.copy_(mask)
        return (full - without) + (alone - empty)

    @torch.no_grad()
    def ablation_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """IS of every open slot, per module (closed slots: 0), in eval mode, by the configured `ablation`; the
        batched path falls back to the sequential one for a model whose loss it cannot split per copy."""
        ablation = self.config.ablation
        if ablation == "batched" and copy_loss(model) is None:
            ablation = "sequential"
        score = {"batched": self.batched_scores, "sequential": self.sequential_scores,
                 "first_order": self.first_order_scores}[ablation]
        was_training = model.training
        model.eval()
        try:
            return score(model)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def sequential_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """IS by one forward pass per ablation, editing the masks in place: the reference the others are held to."""
        full = self.held_out_score(model)
        out = {}
        for name, adapter in self.modules.items():
            mask = adapter.mask.clone()
            adapter.mask.zero_()
            empty = self.held_out_score(model)
            adapter.mask.copy_(mask)
            out[name] = torch.tensor([self.slot_importance(model, adapter, j, full, empty) if mask[j] else 0.0
                                      for j in range(mask.numel())], dtype=torch.float64)
        return out

    @torch.no_grad()
    def batched_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """IS from the same held-out losses as `sequential_scores`, `ablation_tokens` worth of copies per forward.
        The unablated copy's loss is checked against the model's own loss, so a head whose loss is not the
        per-copy one (a custom loss, a batch that is not batch-first) fails loudly instead of scoring wrongly."""
        plan = ablation_plan(self.modules)
        copies = max(1, self.config.ablation_tokens // held_out_tokens(self.held_out))
        keys = list(plan)
        scores: dict[tuple, float] = {}
        for start in range(0, len(keys), copies):
            chunk = keys[start:start + copies]
            scores.update(zip(chunk, self.copy_scores(model, [plan[key] for key in chunk])))
        reference = self.held_out_score(model)
        dtype = next(iter(self.modules.values())).base.weight.dtype
        if abs(scores[FULL] - reference) > loss_tolerance(dtype) * max(1.0, abs(reference)):
            raise ValueError(f"the per-copy held-out loss {-scores[FULL]} differs from the model's own loss "
                             f"{-reference}: score this model with AllocationConfig(ablation='sequential')")
        return {name: torch.tensor([(scores[FULL] - scores[name, j, "without"])
                                    + (scores[name, j, "alone"] - scores[name, "empty"]) if adapter.mask[j] else 0.0
                                    for j in range(adapter.mask.numel())], dtype=torch.float64)
                for name, adapter in self.modules.items()}

    @torch.no_grad()
    def copy_scores(self, model: nn.Module, settings: list[tuple[str, torch.Tensor] | None]) -> list[float]:
        """S = −loss for each gate setting (module, its slot gates; None: the model as it is), one forward in all."""
        gates = {adapter: adapter.gate_values().expand(len(settings), -1).clone()
                 for adapter in self.modules.values()}
        for copy, setting in enumerate(settings):
            if setting is not None:
                name, slot_gates = setting
                gates[self.modules[name]][copy] = slot_gates
        with replica_gates(gates):
            return (-self.copy_losses(model, len(settings))).tolist()

    def copy_losses(self, model: nn.Module, copies: int) -> torch.Tensor:
        """The model's loss on each of `copies` stacked copies of the held-out batch, from one forward."""
        device = next(model.parameters()).device
        inputs = {k: stacked(v.to(device), copies) for k, v in self.held_out.items() if k != "labels"}
        labels = self.held_out["labels"].to(device)
        loss = copy_loss(model)
        return torch.stack([loss(model, logits, labels) for logits in model(**inputs).logits.chunk(copies)])

    def first_order_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """IS to first order in the gates g: S(M) − S(M without j) ≈ ∂S/∂g_j at the current gates and
        S(j alone) − S(none open) ≈ ∂S/∂g_j with every gate closed; one forward and backward each."""
        gradients = [self.gate_gradients(model, closed) for closed in (False, True)]
        return {name: ((gradients[0][name] + gradients[1][name]) * adapter.mask).double().cpu()
                for name, adapter in self.modules.items()}

    def gate_gradients(self, model: nn.Module, closed: bool) -> dict[str, torch.Tensor]:
        """∂S/∂g of every slot, at the current gates or with all closed; the parameters' .grad is left alone."""
        gates = {adapter: (torch.zeros_like if closed else torch.clone)(adapter.gate_values())[None]
                 .requires_grad_() for adapter in self.modules.values()}
        with torch.enable_grad(), replica_gates(gates):
            grads = torch.autograd.grad(-self.held_out_loss(model), list(gates.values()), allow_unused=True)
        return {name: torch.zeros_like(adapter.gate_values()) if g is None else g[0]
                for (name, adapter), g in zip(self.modules.items(), grads)}

    @torch.no_grad()
    def reallocate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """One ALoRA round: close the lowest-scoring open ranks, open as many elsewhere."""
        scores = self.ablation_scores(model)
        open_slots = sorted((float(s[j]), name, j) for name, s in scores.items()
                            for j in self.modules[name].mask.nonzero().flatten().tolist())
        moved = min(max(1, round(self.config.move_fraction * self.b0)), len(open_slots) - 1)
        for _, name, j in open_slots[:moved]:
            self.modules[name].mask[j] = False
        donors = {name for _, name, _ in open_slots[:moved]}
        importance = {name: float(s[a.mask.cpu()].mean()) if a.rank else float("-inf")
                      for (name, a), s in zip(self.modules.items(), scores.values())}
        order = sorted(self.modules, key=lambda name: (name in donors, -importance[name]))
        placed = 0
        while placed < moved:  # one slot per module per pass, so the new ranks spread over the best modules
            for name in order:
                adapter = self.modules[name]
                free = (~adapter.mask).nonzero().flatten()
                if placed < moved and free.numel():
                    adapter.open_slot(int(free[0]), self.generator)
                    self.fresh.reopened(optimizer, name, int(free[0]))
                    placed += 1

    # --- checkpointing ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks, importance EMAs and the slot-drawing RNG: what resuming needs besides the trained tensors."""
        state = {f"mask/{name}": a.mask.detach().cpu().clone() for name, a in self.modules.items()}
        for key, (avg, unc) in self.ema.items():
            state[f"ipt/{key}"], state[f"unc/{key}"] = avg.cpu().clone(), unc.cpu().clone()
        state["generator"] = self.generator.get_state()
        if self.fresh is not None:
            state.update((f"opened/{name}", t.clone()) for name, t in self.fresh.opened_at.items())
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.modules if f"mask/{name}" not in state]
        if missing:
            raise ValueError(f"the allocator state lacks the masks of {', '.join(missing[:3])}: it was saved for "
                             "another model or method")
        for name, adapter in self.modules.items():
            adapter.mask.copy_(state[f"mask/{name}"])
        device = next(iter(self.modules.values())).mask.device
        self.ema = {key.removeprefix("ipt/"): (t.to(device).clone(), state[f"unc/{key.removeprefix('ipt/')}"]
                                               .to(device).clone())
                    for key, t in state.items() if key.startswith("ipt/")}
        self.generator.set_state(state["generator"])
        if self.fresh is not None:
            for name, t in self.fresh.opened_at.items():
                t.copy_(state.get(f"opened/{name}", t))


class FreshSlots:
    """Reopened ALoRA slots as fresh Adam ranks (module docstring): their optimizer state zeroed at reopening, and
    after every later step their update recomputed with bias corrections counted from the reopening."""

    def __init__(self, modules: dict[str, MaskedRank]) -> None:
        self.modules = modules
        # per module and slot, the optimizer's step count when the slot was reopened; -1: open from the start
        self.opened_at = {name: torch.full(a.mask.shape, -1, dtype=torch.int64) for name, a in modules.items()}

    def reopened(self, optimizer: torch.optim.Optimizer | None, name: str, slot: int) -> None:
        """Zero the optimizer state of `slot`'s A row and B column and remember the step count it restarts from."""
        if optimizer is None:
            return
        adapter = self.modules[name]
        for param, axis in adapter.slot_parameters():
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.select(axis, slot).zero_()
        first = adapter.slot_parameters()[0][0]
        self.opened_at[name][slot] = int(optimizer.state.get(first, {}).get("step", 0))

    @torch.no_grad()
    def correct(self, optimizer: torch.optim.Optimizer) -> None:
        """After an optimizer step: give every reopened open slot the update of an Adam started at its reopening."""
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, adapter in self.modules.items():
            slots = ((self.opened_at[name] >= 0) & adapter.mask.cpu()).nonzero().flatten().tolist()
            for param, axis in adapter.slot_parameters():
                group, state = groups.get(id(param)), optimizer.state.get(param, {})
                if not slots or group is None or "exp_avg_sq" not in state or not adam_like(group):
                    continue
                t = int(state["step"])
                for slot in slots:
                    k = t - int(self.opened_at[name][slot])
                    if k >= 1:
                        m, v = state["exp_avg"].select(axis, slot), state["exp_avg_sq"].select(axis, slot)
                        param.select(axis, slot).add_(adam_update(m, v, group, t) - adam_update(m, v, group, k))


def adam_like(group: dict[str, Any]) -> bool:
    """A torch Adam/AdamW parameter group whose update `adam_update` reproduces."""
    return "betas" in group and "eps" in group and not group.get("amsgrad") and not group.get("maximize")


def adam_update(m: torch.Tensor, v: torch.Tensor, group: dict[str, Any], step: int) -> torch.Tensor:
    """The Adam step lr·m̂/(√v̂ + eps) for moments m, v bias-corrected as at step `step` (torch's formula)."""
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    return (lr / (1 - beta1 ** step)) * m / (v.sqrt() / math.sqrt(1 - beta2 ** step) + group["eps"])


# --- batched ablation helpers (ALoRA) ----------------------------------------------------------------------------
FULL = ("full",)  # the key of the unablated model in `ablation_plan`


def loss_tolerance(dtype: torch.dtype) -> float:
    """How closely (relative) the per-copy loss must match the model's own on a base of `dtype`: half the digits of
    the precision the loss is computed in, float32 at least (the Hugging Face heads upcast their logits to it)."""
    return torch.finfo(dtype if torch.finfo(dtype).eps > torch.finfo(torch.float32).eps else torch.float32).eps ** 0.5


def logits_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)


def pooled_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model.loss_function(labels=labels, pooled_logits=logits, config=model.config)


def token_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model.loss_function(logits=logits, labels=labels, config=model.config)


# The loss of one copy from its logits and labels, by Hugging Face head type (`model.loss_type`), called the way the
# heads call `model.loss_function`: the head types whose loss depends on nothing but one copy's logits and labels.
COPY_LOSSES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ForCausalLM": logits_loss, "ForConditionalGeneration": logits_loss, "ForMaskedLM": logits_loss,
    "ForSequenceClassification": pooled_loss, "ForTokenClassification": token_loss,
}


def copy_loss(model: nn.Module) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The per-copy loss of a Hugging Face model's head type (one without a recognised type gets the causal LM
    loss, as `model.loss_function` does); None for other modules or head types."""
    if not hasattr(model, "loss_function"):
        return None
    return COPY_LOSSES.get(getattr(model, "loss_type", None) or "ForCausalLM")


def ablation_plan(modules: dict[str, MaskedRank]) -> dict[tuple, tuple[str, torch.Tensor] | None]:
    """Every gate setting IS needs, by key: FULL (the model as it is: None), and per module (name, "empty") with
    all its slots closed, (name, j, "without") with open slot j closed, (name, j, "alone") with only j open."""
    plan: dict[tuple, tuple[str, torch.Tensor] | None] = {FULL: None}
    for name, adapter in modules.items():
        mask = adapter.gate_values()
        plan[name, "empty"] = (name, torch.zeros_like(mask))
        for j in adapter.mask.nonzero().flatten().tolist():
            without, alone = mask.clone(), torch.zeros_like(mask)
            without[j], alone[j] = 0, 1
            plan[name, j, "without"], plan[name, j, "alone"] = (name, without), (name, alone)
    return plan


def held_out_tokens(held_out: dict[str, torch.Tensor]) -> int:
    """Batch x sequence of the held-out batch (the leading two dimensions of its first input)."""
    first = next(v for k, v in held_out.items() if k != "labels")
    return first.shape[:2].numel()


def stacked(t: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of a batch tensor one after the other along the batch dimension (scalars as they are)."""
    return t.repeat(copies, *([1] * (t.dim() - 1))) if t.dim() else t


def build_allocator(model: nn.Module, total_steps: int, config: AllocationConfig = AllocationConfig(), *,
                    held_out: dict[str, torch.Tensor] | None = None) -> RankAllocator | None:
    """A RankAllocator when the model has adaptive-rank adapters, else None."""
    return RankAllocator(model, total_steps, config, held_out=held_out) if masked_adapters(model) else None


class RankAllocationCallback(TrainerCallback):
    """Rank allocation for `transformers.Trainer`: `Trainer(..., callbacks=[RankAllocationCallback()])`.

    The Trainer zeroes gradients right after its optimizer step, so the allocator runs in `on_optimizer_step`
    (after the step, gradients still there). With `regularise` the adapters' orthogonality regularisers, which a
    stock Trainer does not know, are added to the model's training loss by a forward hook, as PEFT's AdaLoRA adds
    them in its forward: their gradient is then scaled by gradient accumulation and clipped with the rest. Unlike
    PEFT, the hook adds nothing in eval mode, so an evaluation loss stays the task's loss.

    Checkpoints: every time the Trainer saves one, the allocator's state (masks, importance EMAs, slot RNG) is
    written next to it as `rank_allocator.safetensors`, and `trainer.train(resume_from_checkpoint=...)` reads it back
    from `<output_dir>/checkpoint-<step>`, where the Trainer puts its checkpoints; `resume_from` names another folder.
    """

    def __init__(self, config: AllocationConfig = AllocationConfig(), *,
                 held_out: dict[str, torch.Tensor] | None = None, regularise: bool = True,
                 resume_from: str | Path | None = None) -> None:
        self.config, self.held_out, self.regularise = config, held_out, regularise
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.allocator: RankAllocator | None = None
        self.hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self.allocator = build_allocator(model, state.max_steps, self.config, held_out=self.held_out)
        if self.allocator is not None and self.regularise and self.hook is None:
            self.hook = model.register_forward_hook(regularised_loss(list(adapters(model).values())))
        if self.allocator is None or state.global_step == 0:
            return
        path = (self.resume_from or checkpoint_folder(args, state)) / ALLOCATOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"resuming at step {state.global_step} needs the rank allocator's state, and "
                                    f"{path} does not exist: the checkpoint was saved without RankAllocationCallback, "
                                    "or lives elsewhere (pass RankAllocationCallback(resume_from=<checkpoint folder>))")
        self.allocator.load_state_dict(load_file(path))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          optimizer: torch.optim.Optimizer | None = None, **kwargs: Any):
        if self.allocator is not None:
            self.allocator.step(model, state.global_step + 1, optimizer=optimizer)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        folder = checkpoint_folder(args, state)
        if self.allocator is not None and state.is_world_process_zero and folder.is_dir():
            save_file({k: t.contiguous() for k, t in self.allocator.state_dict().items()}, folder / ALLOCATOR_FILE)


def regularised_loss(found: list[nn.Module]) -> Any:
    """A forward hook adding the adapters' mean regulariser to a model output's `loss` while training."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if module.training and torch.is_tensor(loss):
            penalty = regularisation(found)
            if penalty is not None:
                output["loss"] = loss + penalty
        return output

    return hook


def checkpoint_folder(args: Any, state: Any) -> Path:
    """Where `transformers.Trainer` writes (and, resuming from output_dir, reads) the checkpoint of this step."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def layer_order(layer: int | None) -> int:
    return -1 if layer is None else layer


def rank_table(ranks_by_module: dict[str, int]) -> list[str]:
    """One line per module type: its rank in every layer, in layer order, and the type's total."""
    by_kind: dict[str, dict[int | None, int]] = {}
    for name, rank in ranks_by_module.items():
        kind, layer = split_name(name)
        by_kind.setdefault(kind, {})[layer] = rank
    return [f"{kind:<28}{sum(row.values()):>6}  " + " ".join(str(row[layer]) for layer in sorted(row, key=layer_order))
            for kind, row in sorted(by_kind.items())]


def plot_ranks(ranks_by_module: dict[str, int], stem: Path) -> Path:
    """Heat map of the active rank per layer (x) and module type (y), numbers in the cells; writes stem.png/.svg."""
    from .plotting import save_figure, subplots

    cells = {split_name(name): rank for name, rank in ranks_by_module.items()}
    kinds = sorted({kind for kind, _ in cells})
    layers = sorted({layer for _, layer in cells}, key=layer_order)
    grid = torch.full((len(kinds), len(layers)), float("nan"))
    for (kind, layer), rank in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = rank
    fig, ax = subplots(figsize=(max(4.0, 0.45 * len(layers) + 2.5), 0.45 * len(kinds) + 1.5))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    if len(layers) * len(kinds) <= 400:
        for (kind, layer), rank in cells.items():
            ax.text(layers.index(layer), kinds.index(kind), str(rank), ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers], fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(f"active rank per module (total {sum(ranks_by_module.values())})")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, stem)
