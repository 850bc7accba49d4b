"""An svdtune-adapted model under TRL's SFTTrainer: its default gradient checkpointing trains every adapter tensor,
RankAllocationCallback drives an adaptive method, and AdapterCheckpointCallback keeps the adapter, not the model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import svdtune
from svdtune.allocate import RankAllocationCallback
from svdtune.hf import ADAPTER_DIR, AdapterCheckpointCallback

from lm_helpers import char_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        eos_token_id=1)).eval()


def sft(model, tmp_path, callbacks, steps: int = 4):
    data = datasets.Dataset.from_list([{"text": t} for t in ("the cat sat on the mat", "a dog ran in the park")] * 8)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                         save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
    assert args.gradient_checkpointing, "SFTTrainer's default: checkpointed layers"
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer(),
                             callbacks=callbacks)
    trainer.train()
    return trainer


def test_sft_trainer_trains_every_adapter_tensor_and_saves_only_adapters(tmp_path) -> None:
    model = svdtune.adapt(tiny_llama(), "pissa", r=2, verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sft(model, tmp_path, [AdapterCheckpointCallback(every=2)])
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before), "gradient checkpointing passed gradients to every adapter tensor"
    assert (tmp_path / "checkpoint-2" / ADAPTER_DIR).is_dir() and (tmp_path / "checkpoint-4" / ADAPTER_DIR).is_dir()
    assert not list(tmp_path.rglob("model.safetensors")), "no whole-model weights were written"
    fresh = svdtune.load_adapter(tiny_llama(), tmp_path / ADAPTER_DIR)
    trained, loaded = svdtune.adapters(model), svdtune.adapters(fresh)
    assert trained.keys() == loaded.keys()
    for name, adapter in trained.items():  # the final adapter is the trained one, bit for bit
        mine, theirs = adapter.adapter_tensors(), loaded[name].adapter_tensors()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_sft_trainer_with_the_rank_allocation_callback_prunes_adalora(tmp_path) -> None:
    model = svdtune.adapt(tiny_llama(), "adalora", r=4, verbose=False)
    sft(model, tmp_path, [RankAllocationCallback(svdtune.allocate.AllocationConfig(target_rank=2, interval=2)),
                          AdapterCheckpointCallback()], steps=12)
    ranks = svdtune.allocate.ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks), "pruned to the target budget"
    saved = svdtune.load_adapter(tiny_llama(), tmp_path / ADAPTER_DIR)
    assert svdtune.allocate.ranks(saved) == ranks
