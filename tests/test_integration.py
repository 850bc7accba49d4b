"""An adapted model is still an ordinary nn.Module: HF Trainer trains it, generate() runs, bf16 bases work."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

import svdtune

from helpers import make_model, output, relative_error, tokens


def test_hf_trainer_trains_only_the_adapter(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "pissa", r=4, verbose=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = tokens(batch=8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(n.endswith((".A", ".B")) for n in trainable)


def test_generate_runs_unmerged_and_merged_identically() -> None:
    model = svdtune.adapt(make_model(), "olora", r=4, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    prompt = tokens(batch=1, length=4)
    unmerged = model.generate(prompt, max_new_tokens=6, do_sample=False)
    merged = svdtune.merge(model).generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(unmerged, merged)


def test_bf16_base_keeps_its_output_at_init_for_residual_methods() -> None:
    """Folding W_res = W - s·B0·A0 into a bf16 weight (the usual way) moves these logits by ~6e-3 relative."""
    ids = tokens()
    reference = output(make_model(dtype=torch.bfloat16), ids)
    for method in ("pissa", "milora", "olora"):
        model = svdtune.adapt(make_model(dtype=torch.bfloat16), method, r=4, verbose=False)
        assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.parameters()), \
            "a 16-bit base stays 16-bit; the adapter's own tensors are float32"
        assert relative_error(output(model, ids).float(), reference.float()) <= 1e-4, method
