"""Recipes: the steps of one fine-tuning run in one place, shared by `svdtune train` and `svdtune bench`.

`fine_tune` loads a fresh model, makes it trainable with a method, and trains it; `hits` scores any model on rows
of a task, one outcome per row, so the benchmark can pair examples across methods.

* Sequence classification (a `Task` of kind "classification"): the model gets a fresh head (seeded) that trains in
  full beside the adapter (`train_also`); "head-only" trains the head alone, the reference any adapter must beat.
* Causal LM ("choice", "generation"; see `data.causal_lm`): the model as published, the loss on the answer tokens
  only, with the LM head computed at those positions alone (`causal_lm.answer_loss`), several examples to a row
  (`causal_lm.encode_packed`: the same loss, without the padding that nearly doubles a right-padded batch).
* `method` is a registered svdtune method, "head-only", or a reference run (`references`: full fine-tuning,
  PEFT's LoRA, PiSSA, AdaLoRA).
* `precision="bf16"` holds the frozen base in bfloat16 (causal LMs): the frozen products run at bf16 speed, while
  the adapter's tensors and AdamW state stay float32 (`core.adapter_dtype`). This is what makes a CPU or GPU with
  bf16 matrix units train fast; autocast around a float32 base (`TrainConfig.mixed_precision`) converts every
  weight at every call instead. On a CPU without bf16 matrix units, where PyTorch's own bf16 products are tens of
  times slower than float32, training (`loop.train`) and scoring (`hits`) run their products as float32 products
  of the bf16 values (`upcast.bf16_products`): the numerics of a bf16 unit at float32 speed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.causal_lm import activation_dtype, answer_loss, lm_batches, lm_hits
from ..data.classification import classification_batches, classification_hits, encode
from ..data.tasks import CLASSIFICATION, Task
from ..inject import adapt, resolve_targets
from ..methods import METHODS, get_method
from ..upcast import bf16_products
from .loop import TrainConfig, TrainResult, train
from .references import is_reference, module_names, prepare

HEAD_ONLY = "head-only"
PRECISIONS = {"float32": torch.float32, "bf16": torch.bfloat16}


def load_classifier(name: str, seed: int, num_labels: int = 2) -> tuple[torch.nn.Module, Any]:
    """The model `name` with a `num_labels`-way classification head initialised from `seed`."""
    from ..data.models import load_model

    torch.manual_seed(seed)
    return load_model(name, num_labels=num_labels)


def load_causal_lm(name: str, seed: int) -> tuple[torch.nn.Module, Any]:
    """The causal LM `name` as published (nothing random in it: `seed` is for a common signature)."""
    from ..data.models import load_model

    return load_model(name)


Loader = Callable[[str, int], tuple[torch.nn.Module, Any]]


@dataclass
class FineTuneResult:
    model: torch.nn.Module
    tokenizer: Any
    trainable: int  # trained parameters (a task head is not counted)
    factor_seconds: float  # SVD/QR (svdtune) or adapter set-up (references)
    training: TrainResult


def fine_tune(model_name: str, train_rows: list[dict], task: Task, method: str, options: dict[str, Any],
              config: TrainConfig, *, seed: int, batch_size: int, max_length: int, precision: str = "float32",
              reference_rank: int = 8, cache: bool = False, metrics_path: Path | None = None,
              checkpoint_dir: Path | None = None, load: Loader | None = None,
              progress: bool = True) -> FineTuneResult:
    """Load `model_name`, make it trainable with `method` (options for an svdtune method; a reference uses rank
    `reference_rank`), and train it on `train_rows` of `task` (its kind decides the loss, the batches and
    whether its head trains beside the adapter)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = task.kind
    if precision != "float32" and kind == CLASSIFICATION:
        raise ValueError("a bf16 base is for causal LMs: a classifier's head trains in float32 on float32 features; "
                         "use TrainConfig(mixed_precision='bf16') (autocast) for classifiers")
    classifier = kind == CLASSIFICATION
    model, tokenizer = (load or (load_classifier if classifier else load_causal_lm))(model_name, seed)
    model.to(PRECISIONS[precision])
    torch.manual_seed(seed)
    loss_fn = None if classifier else answer_loss
    on_step, head = None, None
    if method == HEAD_ONLY and task.head is None:
        raise ValueError(f"head-only trains a task head, and {task.name!r} has none (a causal LM answers with its "
                         "own LM head): choose an adapter method")
    if method == HEAD_ONLY:
        for name, p in model.named_parameters():
            p.requires_grad_(bool(re.search(task.head_pattern, name)))
        trainable, factor_seconds, head = 0, 0.0, []  # the head is what trains: at the run's own rate
    elif is_reference(method):
        targets = module_names(resolve_targets(model, None)[1])
        prepared = prepare(model, method, r=reference_rank, targets=targets, steps=config.steps,
                           allocation=config.allocation, head=task.head)
        model, trainable, factor_seconds = prepared.model, prepared.trainable, prepared.init_seconds
        on_step, head = prepared.on_step, prepared.head
        loss_fn = None if prepared.own_loss else loss_fn
    else:
        adapt(model, method, train_also=task.head_pattern, cache=cache, verbose=False, progress=False,
              **options)
        summary = model.svdtune_summary
        trainable, factor_seconds = summary.trainable - summary.train_also, summary.factor_seconds
    held_out = None
    if method in METHODS and getattr(get_method(method), "ablation", False):
        train_rows, held = train_rows[:-batch_size], train_rows[-batch_size:]  # ALoRA scores ranks on unseen rows
        held_out = (encode(tokenizer, held, max_length=max_length) if classifier
                    else next(lm_batches(tokenizer, held, kind=kind, batch_size=batch_size, seed=seed,
                                         max_length=max_length)))
    batches = (classification_batches(tokenizer, train_rows, batch_size=batch_size, seed=seed, max_length=max_length)
               if classifier else
               lm_batches(tokenizer, train_rows, kind=kind, batch_size=batch_size, seed=seed, max_length=max_length,
                          packed=True, dtype=activation_dtype(model)))
    result = train(model, batches, config, metrics_path=metrics_path, checkpoint_dir=checkpoint_dir,
                   progress=progress, description=f"{method} seed {seed}", held_out=held_out, loss_fn=loss_fn,
                   on_step=on_step, head=head)
    return FineTuneResult(model, tokenizer, trainable, factor_seconds, result)


def hits(model: torch.nn.Module, tokenizer: Any, rows: list[dict], kind: str, max_length: int) -> list[bool]:
    """Per row, whether the model gets it right (classification, choice accuracy, or exact match)."""
    if kind == CLASSIFICATION:
        return classification_hits(model, tokenizer, rows, max_length=max_length)
    with bf16_products(model):
        return lm_hits(model, tokenizer, rows, kind, max_length=max_length)

