"""svdtune adapters under Hugging Face `Trainer` and TRL's `SFTTrainer`: the adapter, not the whole model, on disk.

A stock Trainer checkpoints the whole model (every frozen base weight, hundreds of MB) because an svdtune-adapted
model is an ordinary `PreTrainedModel`. `AdapterCheckpointCallback` writes the svdtune adapter (safetensors + JSON,
kilobytes to megabytes) instead: next to every checkpoint the Trainer saves, every `every` steps on its own (so a run
can set `save_strategy="no"` and keep only adapters), and at the end of training into `output_dir/adapter`.

    from svdtune.hf import AdapterCheckpointCallback
    SFTTrainer(model=svdtune.adapt(model, "pissa"), args=SFTConfig(..., save_strategy="no"), train_dataset=data,
               callbacks=[AdapterCheckpointCallback(every=100)])

Gradient checkpointing (SFTTrainer's default) needs nothing more: transformers' non-reentrant checkpointing passes
gradients to adapter parameters inside a checkpointed layer although the embeddings are frozen (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .io import save_adapter

ADAPTER_DIR = "adapter"


class AdapterCheckpointCallback(TrainerCallback):
    """Save the svdtune adapter at Trainer checkpoints, every `every` steps, and at the end (module docstring)."""

    def __init__(self, every: int | None = None) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive number of steps (or None), got {every!r}")
        self.every = every

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if self.every is not None and state.global_step % self.every == 0:
            self._save(args, state, model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_DIR)

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self._save(args, state, model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_DIR)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self._save(args, state, model, Path(args.output_dir) / ADAPTER_DIR)

    @staticmethod
    def _save(args: Any, state: Any, model: nn.Module | None, path: Path) -> None:
        if model is not None and state.is_world_process_zero:  # one writer under DDP
            save_adapter(model, path, overwrite=True)
