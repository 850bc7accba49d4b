"""Recipes: the steps of one fine-tuning run in one place, shared by `svdtune train` and `svdtune bench`.

Sequence classification: load the model with a fresh head (seeded), adapt it with `method` (the head trains in full
beside the adapter, `train_also`), train on the task's training split, and score accuracy on its held-out split.
"head-only" trains the head alone: the reference any adapter must beat.

Causal LM (multiple choice, generation; see `lmtasks`): load the model as it is, adapt it, train with the loss on
the answer tokens only, and score choice accuracy or exact match on the held-out split.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .inject import adapt
from .lmtasks import Kind, lm_batches, lm_score
from .methods import get_method
from .tasks import accuracy, classification_batches, encode
from .train import TrainConfig, TrainResult, train

HEAD_ONLY = "head-only"
HEAD = r"^classifier\."


def load_classifier(name: str, seed: int, num_labels: int = 2) -> tuple[torch.nn.Module, Any]:
    """The model `name` with a `num_labels`-way classification head initialised from `seed`."""
    from .models import load_model

    torch.manual_seed(seed)
    return load_model(name, num_labels=num_labels)


@dataclass
class FineTuneResult:
    model: torch.nn.Module
    tokenizer: Any
    score: float
    trainable: int  # adapter parameters (the task head is not counted)
    factor_seconds: float
    training: TrainResult


def load_causal_lm(name: str, seed: int) -> tuple[torch.nn.Module, Any]:
    """The causal LM `name` as published (nothing random in it: `seed` is for a common signature)."""
    from .models import load_model

    return load_model(name)


Loader = Callable[[str, int], tuple[torch.nn.Module, Any]]


def fine_tune_classifier(model_name: str, data: tuple[list[dict], list[dict]], method: str, options: dict[str, Any],
                         config: TrainConfig, *, seed: int, batch_size: int, max_length: int = 64,
                         eval_size: int | None = None, cache: bool = False, metrics_path: Path | None = None,
                         checkpoint_dir: Path | None = None, load: Loader = load_classifier,
                         progress: bool = True) -> FineTuneResult:
    train_rows, eval_rows = data
    model, tokenizer = load(model_name, seed)
    torch.manual_seed(seed)
    if method == HEAD_ONLY:
        for name, p in model.named_parameters():
            p.requires_grad_(bool(re.search(HEAD, name)))
        trainable, factor_seconds = 0, 0.0
    else:
        trainable, factor_seconds = _adapt(model, method, options, cache=cache, train_also=HEAD)
    held_out = None
    if method != HEAD_ONLY and getattr(get_method(method), "ablation", False):  # ALoRA: scored on unseen rows
        train_rows, held = train_rows[:-batch_size], train_rows[-batch_size:]
        held_out = encode(tokenizer, held, max_length=max_length)
    batches = classification_batches(tokenizer, train_rows, batch_size=batch_size, seed=seed, max_length=max_length)
    result = train(model, batches, config, metrics_path=metrics_path, checkpoint_dir=checkpoint_dir,
                   progress=progress, description=f"{method} seed {seed}", held_out=held_out)
    score = accuracy(model, tokenizer, eval_rows[:eval_size], max_length=max_length)
    return FineTuneResult(model, tokenizer, score, trainable, factor_seconds, result)


def fine_tune_lm(model_name: str, data: tuple[list[dict], list[dict]], kind: Kind, method: str,
                 options: dict[str, Any], config: TrainConfig, *, seed: int, batch_size: int, max_length: int = 256,
                 eval_size: int | None = None, cache: bool = False, metrics_path: Path | None = None,
                 checkpoint_dir: Path | None = None, load: Loader = load_causal_lm,
                 progress: bool = True) -> FineTuneResult:
    """Adapt a causal LM, train it on answer tokens of the training rows, score it on the held-out rows."""
    train_rows, eval_rows = data
    model, tokenizer = load(model_name, seed)
    torch.manual_seed(seed)
    trainable, factor_seconds = _adapt(model, method, options, cache=cache)
    batches = lm_batches(tokenizer, train_rows, kind=kind, batch_size=batch_size, seed=seed, max_length=max_length)
    result = train(model, batches, config, metrics_path=metrics_path, checkpoint_dir=checkpoint_dir,
                   progress=progress, description=f"{method} seed {seed}")
    score = lm_score(model, tokenizer, eval_rows[:eval_size], kind, max_length=max_length)
    return FineTuneResult(model, tokenizer, score, trainable, factor_seconds, result)


def _adapt(model: torch.nn.Module, method: str, options: dict[str, Any], *, cache: bool,
           train_also: str | None = None) -> tuple[int, float]:
    """Adapt `model` quietly; (adapter parameters without train_also, seconds spent factorising)."""
    adapt(model, method, train_also=train_also, cache=cache, verbose=False, progress=False, **options)
    summary = model.svdtune_summary
    return summary.trainable - summary.train_also, summary.factor_seconds
