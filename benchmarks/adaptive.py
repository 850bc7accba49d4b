"""Adaptive rank on the embedded SmolLM2-135M (fp32, all 210 default target matrices), every method at r_max = 8:
parameter counts at init and after pruning, the step-time overhead of importance scoring against plain LoRA, the cost
of one ALoRA reallocation round, and how much scoring work LoRA² saves against AdaLoRA-style scoring.

    python benchmarks/adaptive.py [--batch 4] [--seq 128] [--warmup 2] [--rounds 3] [--steps 2]
                                  [--round-targets REGEX] [--round-repeats 2] [--out benchmarks/results/adaptive.json]

Configurations: lora r=8; adalora r=8; lora2 r=8, k=8 (the paper code's, so cross_reg=0); alora r=4 open of r_max=8
slots. A step is forward, backward of the loss plus the mean regulariser, AdamW, the allocator's call, zero_grad, on
one fixed batch of random token ids (labels = inputs). The allocator is set so that it scores every step and never
masks during the timing (masking is a sort once every ΔT steps). Timed steps are interleaved (A B C D, A B C D, ...)
as in step_time.py, so machine drift hits all alike; the table gives medians and ratios to lora. The allocator's own
time is also measured alone.

Parameter counts: "allocated" is what the optimizer holds (static shapes), "active" what carries the update. After
pruning: AdaLoRA/LoRA² masked to the default final budget (2/3 of r per matrix on average) by the importance scores
the timed steps accumulated; ALoRA after one reallocation round on a held-out batch of 1 x 32 tokens (its total is
invariant by construction).

ALoRA's round, scoring by scoring: one reallocation round with each `AllocationConfig.ablation` ("sequential", one
forward per ablation, the scoring before batching; "batched", exact, many ablations per forward; "first_order", gate
gradients) on identical copies of the same model and optimizer, interleaved `--round-repeats` times: the time ratio
to the reference, whether the decisions are the same, and how many of the reference's closings and openings each
reproduces. The sequential reference costs one forward per ablation (1,891 on all 210 modules), so it runs on an
ALoRA model of the modules `--round-targets` picks (every linear layer of every fifth layer: 42 modules, all depths,
63 ablations per layer as in the full model), trained for a few steps; on the full model (after the timed steps) the
exact batched round is the reference for the first-order one.

LoRA² scoring: entries whose sensitivity is tracked per matrix (AdaLoRA: P, λ, Q, i.e. r(m+n)+r; LoRA²: λ, B, aa,
i.e. r + 2rk), for each matrix shape of the model; the EMA update costs a fixed number of flops per entry, so the
entry ratio is the work ratio; the measured allocator time per step shows what it is worth in practice.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time
from collections import Counter

import torch
from harness import make_batch, markdown_table, time_interleaved, write_result

import svdtune
from svdtune.allocate import AllocationConfig, RankAllocator, ranks
from svdtune.core import regularisation
from svdtune.data.models import load_model

CONFIGS = {"lora": {"r": 8}, "adalora": {"r": 8}, "lora2": {"r": 8, "k": 8, "cross_reg": 0.0},
           "alora": {"r": 4, "r_max": 8}}
NEVER = 10 ** 9  # a schedule so long that the timed steps only score, never mask


def counts(model: torch.nn.Module) -> dict[str, int]:
    found = svdtune.adapters(model).values()
    allocated = sum(type(a).count_trainable(*a.shape, a.config) for a in found)
    active = sum(a.active_parameters() if hasattr(a, "active_parameters") else type(a).count_trainable(
        *a.shape, a.config) for a in found)
    return {"allocated": allocated, "active": active, "total_rank": sum(ranks(model).values())}


def scored_entries(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Entries whose sensitivity is tracked, per matrix shape."""
    out = {}
    for a in svdtune.adapters(model).values():
        out[f"{a.shape[0]}x{a.shape[1]}"] = sum(getattr(a, t).numel() for t, _ in a.scored)
    return out


ROUND_TARGETS = r"layers\.\d*[05]\."  # every linear layer of every fifth layer: 42 modules, all depths


def changed_slots(before: torch.Tensor, after: torch.Tensor) -> tuple[set[int], set[int]]:
    """Indices (in the concatenated masks) of the slots a round closed and of those it opened."""
    closed, opened = before & ~after, ~before & after
    return set(closed.nonzero().flatten().tolist()), set(opened.nonzero().flatten().tolist())


def compare_rounds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, held_out: dict,
                   scorings: tuple[str, ...], repeats: int) -> tuple[dict, torch.Tensor]:
    """One reallocation round per scoring on copies of the same model and optimizer, interleaved `repeats` times:
    seconds, the ratio of the first scoring's time (the reference) to each one's, and how many of the reference's
    closings and openings each reproduces. Also returns the masks the reference round left."""
    before = torch.cat([a.mask for a in svdtune.adapters(model).values()]).clone()
    seconds: dict[str, list[float]] = {name: [] for name in scorings}
    after: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name in scorings:
            trial, trial_optimizer = copy.deepcopy((model, optimizer))
            allocator = RankAllocator(trial, NEVER, AllocationConfig(t_init=NEVER - 2, t_final=1, ablation=name),
                                      held_out=held_out)
            tick = time.perf_counter()
            allocator.reallocate(trial, trial_optimizer)
            seconds[name].append(time.perf_counter() - tick)
            after[name] = torch.cat([a.mask for a in allocator.modules.values()]).clone()
            del trial, trial_optimizer, allocator
    median = {name: statistics.median(s) for name, s in seconds.items()}
    reference = changed_slots(before, after[scorings[0]])
    modules = svdtune.adapters(model).values()
    return {"reference": scorings[0], "modules": len(modules), "ablations": 1 + sum(1 + 2 * a.rank for a in modules),
            "moved": len(reference[0]), "median_s": {k: round(v, 2) for k, v in median.items()},
            "x_faster_than_reference": {k: round(median[scorings[0]] / v, 2) for k, v in median.items()},
            "agreement": {name: {"same_decisions": torch.equal(after[name], after[scorings[0]]),
                                 "closed_in_common": len(changed_slots(before, after[name])[0] & reference[0]),
                                 "opened_in_common": len(changed_slots(before, after[name])[1] & reference[1])}
                          for name in scorings},
            "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()}}, after[scorings[0]]


def round_rows(label: str, result: dict) -> list[list[str]]:
    moved = result["moved"]
    return [[f"{label}: {name}", str(result["modules"]), str(result["ablations"]), f"{result['median_s'][name]:.2f}",
             f"{result['x_faster_than_reference'][name]:.1f} (vs {result['reference']})",
             "yes" if agreement["same_decisions"] else "no",
             f"{agreement['closed_in_common']}/{moved}, {agreement['opened_in_common']}/{moved}"]
            for name, agreement in result["agreement"].items()]


def trained_alora(base: torch.nn.Module, targets: str, batch: dict, lr: float,
                  steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """ALoRA on `targets`, trained for a few AdamW steps (so B != 0 and the slots' importances differ)."""
    model = svdtune.adapt(copy.deepcopy(base), "alora", targets=targets, cache=False, verbose=False, progress=False,
                          **CONFIGS["alora"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration in each round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-targets", default=ROUND_TARGETS, help="ALoRA modules of the round with all scorings")
    parser.add_argument("--round-repeats", type=int, default=2, help="interleaved repeats of that comparison")
    parser.add_argument("--out", default="benchmarks/results/adaptive.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    base, _ = load_model("smollm2-135m")
    batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.seed, "cpu")
    held_out = make_batch(base.config.vocab_size, 1, 32, args.seed + 1, "cpu")
    models, allocators, optimizers, steps, at_init = {}, {}, {}, {}, {}
    allocator_seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name, options in CONFIGS.items():
        model = svdtune.adapt(copy.deepcopy(base), name, cache=False, verbose=False, progress=False, **options)
        model.train()
        at_init[name] = counts(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=0.0)
        allocator = (RankAllocator(model, NEVER, AllocationConfig(t_init=NEVER - 2, t_final=1), held_out=held_out)
                     if name != "lora" else None)
        models[name], allocators[name], optimizers[name] = model, allocator, optimizer

        def step(model=model, optimizer=optimizer, allocator=allocator, name=name,
                 counter=itertools.count(1)) -> None:
            loss = model(**batch).loss
            penalty = regularisation(svdtune.adapters(model).values())
            (loss if penalty is None else loss + penalty).backward()
            optimizer.step()
            if allocator is not None:
                tick = time.perf_counter()
                allocator.step(model, next(counter), optimizer=optimizer)
                allocator_seconds[name].append(time.perf_counter() - tick)
            optimizer.zero_grad()

        steps[name] = step
    subset, _ = compare_rounds(*trained_alora(base, args.round_targets, batch, args.lr, args.warmup + 2), held_out,
                               ("sequential", "batched", "first_order"), args.round_repeats)
    del base
    seconds = time_interleaved(steps, args.warmup, args.rounds, args.steps)
    median = {name: statistics.median(s) for name, s in seconds.items()}

    pruned = {}
    for name in ("adalora", "lora2"):
        allocator = allocators[name]
        allocator.mask_to(RankAllocator(models[name], 100).bT)  # the default final budget
        pruned[name] = counts(models[name])
    full, reference_masks = compare_rounds(models["alora"], optimizers["alora"], held_out, ("batched", "first_order"),
                                           1)
    for adapter, mask in zip(allocators["alora"].modules.values(),
                             reference_masks.split([a.mask.numel() for a in allocators["alora"].modules.values()])):
        adapter.mask.copy_(mask)  # the exact round's allocation, for the parameter counts after it
    pruned["alora"] = counts(models["alora"])
    rank_spread = Counter(ranks(models["alora"]).values())

    entries = {name: scored_entries(models[name]) for name in ("adalora", "lora2")}
    saving = {shape: {"adalora": entries["adalora"][shape], "lora2": entries["lora2"][shape],
                      "saved_percent": round(100 * (1 - entries["lora2"][shape] / entries["adalora"][shape]), 2)}
              for shape in entries["adalora"]}
    total_entries = {name: sum(entries[name][s] * n for s, n in Counter(
        f"{a.shape[0]}x{a.shape[1]}" for a in svdtune.adapters(models[name]).values()).items())
        for name in entries}
    alloc_median = {name: statistics.median(s) if s else 0.0 for name, s in allocator_seconds.items()}
    rows = {name: {"median_step_s": round(median[name], 4), "x_lora": round(median[name] / median["lora"], 3),
                   "allocator_median_s": round(alloc_median[name], 5),
                   "allocator_share_of_step": round(alloc_median[name] / median[name], 4),
                   "parameters_at_init": at_init[name], "parameters_after_pruning": pruned.get(name),
                   "step_seconds": [round(s, 4) for s in seconds[name]]} for name in CONFIGS}
    lora2_scoring = {"per_matrix_shape": saving, "model_total": total_entries,
                     "saved_percent": round(100 * (1 - total_entries["lora2"] / total_entries["adalora"]), 2)}
    alora_rounds = {"subset": {"targets": args.round_targets, **subset}, "all_210_modules": full,
                    "ranks_after": dict(sorted(rank_spread.items())), "held_out_tokens": 32}
    settings = {"model": "smollm2-135m", "dtype": "float32", "device": "cpu", "modules": 210, "configs": CONFIGS,
                "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "rounds": args.rounds,
                "steps_per_round": args.steps, "seed": args.seed, "round_repeats": args.round_repeats,
                "threads": torch.get_num_threads(), "load_average_at_start": load,
                "wall_seconds": round(time.perf_counter() - start, 1)}

    def after_text(row: dict) -> str:
        after = row["parameters_after_pruning"]
        return f"{after['active']:,} (total rank {after['total_rank']})" if after else "-"

    table = markdown_table(
        [f"method (r_max 8, {args.batch}x{args.seq} tokens)", "× lora step", "median step s", "allocator s/step",
         "trainable allocated", "active at init", "active after pruning"],
        [[name, f"{row['x_lora']:.2f}", f"{row['median_step_s']:.3f}", f"{row['allocator_median_s']:.4f}",
          f"{row['parameters_at_init']['allocated']:,}", f"{row['parameters_at_init']['active']:,}", after_text(row)]
         for name, row in rows.items()])
    table += (f"\nLoRA² scores {lora2_scoring['saved_percent']}% fewer entries than AdaLoRA-style scoring "
              f"({total_entries['lora2']:,} vs {total_entries['adalora']:,} over the model). ALoRA ranks after one "
              f"exact round on all 210 modules: {dict(sorted(rank_spread.items()))}.\n\n")
    table += markdown_table(["ALoRA round (1x32 held-out tokens): scoring", "modules", "ablations", "median s",
                             "× faster", "same decisions", "closed, opened in common"],
                            round_rows("every 5th layer", subset) + round_rows("all modules", full))
    write_result(args.out, "adaptive", settings,
                 {"configs": rows, "lora2_scoring": lora2_scoring, "alora_rounds": alora_rounds}, table)

if __name__ == "__main__":
    main()
