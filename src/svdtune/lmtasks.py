"""Causal-LM tasks: multiple choice by log-likelihood, generation by exact match, and answer-only training batches.

One encoder serves training and scoring. A row becomes a prompt and a target, ``prompt + " " + target``:

    multiple choice  prompt = row["question"], target = row["choices"][i]
    generation       prompt = "Question: {question}\\nAnswer:", target = row["answer"] (+ EOS when training)

Training puts the LM loss on the target tokens only (prompt and padding labels are -100), the correct choice being
the target. Multiple choice is scored by the log-likelihood of each choice's tokens given the prompt, divided by the
choice's length in characters (lm-evaluation-harness's ``acc_norm``, independent of the tokenizer), and the highest
wins. Generation decodes greedily and compares the final number of the completion with the reference's
(``#### N`` if present, else the last number). The same functions score the untouched base model, so every result
has a zero-shot reference.

The prompt and the target are tokenised separately and concatenated, so the target's tokens are the same in every
batch and under every prompt length; a too-long example loses the start of its prompt, never its target.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import torch
from torch import nn

from .tasks import seeded_chunks

Row = dict[str, Any]
Kind = Literal["choice", "generation"]
IGNORE = -100  # label of a token without loss (prompt, padding)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def prompt_text(row: Row, kind: Kind) -> str:
    return row["question"] if kind == "choice" else f"Question: {row['question']}\nAnswer:"


def encode(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, max_length: int,
           eos: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + " " + target`` sequences, labels only on the target (and EOS with ``eos``)."""
    if not prompts:
        raise ValueError("nothing to encode: no examples")
    sequences, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        if eos:
            tail = tail + [tokenizer.eos_token_id]
        tail = tail[:max_length - 1]
        head = head[max(0, len(head) - (max_length - len(tail))):]
        sequences.append(head + tail)
        labels.append([IGNORE] * len(head) + tail)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id

    def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    return {"input_ids": padded(sequences, pad), "attention_mask": padded([[1] * len(s) for s in sequences], 0),
            "labels": padded(labels, IGNORE)}


def training_pairs(rows: Sequence[Row], kind: Kind) -> tuple[list[str], list[str]]:
    """(prompts, targets) a model learns from: the correct choice, or the worked answer."""
    targets = [row["choices"][row["label"]] if kind == "choice" else row["answer"] for row in rows]
    return [prompt_text(row, kind) for row in rows], targets


def lm_batches(tokenizer: Any, rows: Sequence[Row], *, kind: Kind, batch_size: int, seed: int,
               max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of answer-only training batches, reshuffled every epoch from `seed`."""
    for chunk in seeded_chunks(rows, batch_size=batch_size, seed=seed):
        prompts, targets = training_pairs(chunk, kind)
        yield encode(tokenizer, prompts, targets, max_length=max_length, eos=kind == "generation")


def target_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(token | everything before it) over each sequence's labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, batch_size: int = 32,
                  max_length: int = 512) -> list[list[float]]:
    """Per row, each choice's log-likelihood given the prompt divided by the choice's length in characters.

    Sequences are batched in order of length, so a batch wastes little on padding (the middle 90% of BoolQ's
    prompts span 263 to 1,220 characters)."""
    pairs = [(i, prompt_text(row, "choice"), choice) for i, row in enumerate(rows) for choice in row["choices"]]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1]) + len(pairs[k][2]))
    device = next(model.parameters()).device
    values = [0.0] * len(pairs)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = encode(tokenizer, [pairs[k][1] for k in chunk], [pairs[k][2] for k in chunk],
                           max_length=max_length)
            logprobs = target_logprobs(model, {key: v.to(device) for key, v in batch.items()})
            for k, lp in zip(chunk, logprobs):
                values[k] = float(lp) / len(pairs[k][2])
    scores: list[list[float]] = [[] for _ in rows]
    for (i, _, _), value in zip(pairs, values):
        scores[i].append(value)
    return scores


def choice_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, batch_size: int = 32,
                    max_length: int = 512) -> float:
    """Fraction of rows whose highest length-normalised choice is the labelled one (ties: the first choice)."""
    if not rows:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    scores = choice_scores(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    return sum(max(range(len(s)), key=s.__getitem__) == row["label"] for s, row in zip(scores, rows)) / len(rows)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256,
             batch_size: int = 16, max_length: int = 512) -> list[str]:
    """Greedy completions, left-padded batches; a completion ends at EOS or where it starts a new "Question:"."""
    device = next(model.parameters()).device
    completions = []
    with _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(p)["input_ids"][-max_length:] for p in prompts[start:start + batch_size]]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in out[:, width:]:
                completions.append(tokenizer.decode(row, skip_special_tokens=True).split("Question:")[0])
    return completions


def final_number(text: str) -> Decimal | None:
    """The number after the first "####", else the last number in `text` ("$1,080.00" -> 1080); None if none."""
    where = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(where)
    if not found:
        return None
    chosen = found[0] if "####" in text else found[-1]
    try:
        return Decimal(chosen.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def exact_match(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, max_new_tokens: int = 256,
                batch_size: int = 16, max_length: int = 512) -> float:
    """Fraction of rows whose greedy completion's final number equals the reference answer's."""
    if not rows:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    completions = generate(model, tokenizer, [prompt_text(row, "generation") for row in rows],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    hits = [(got := final_number(c)) is not None and got == final_number(row["answer"])
            for c, row in zip(completions, rows)]
    return sum(hits) / len(rows)


def lm_score(model: nn.Module, tokenizer: Any, rows: Sequence[Row], kind: Kind, *, max_length: int = 512) -> float:
    """The task's metric: choice accuracy or exact match."""
    if kind == "choice":
        return choice_accuracy(model, tokenizer, rows, max_length=max_length)
    return exact_match(model, tokenizer, rows, max_length=max_length)


class _eval_mode:
    """Eval mode inside the block, the model's previous mode after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
