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
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import torch
from torch import nn

from .classification import seeded_chunks

Row = dict[str, Any]
Kind = Literal["choice", "generation"]
IGNORE = -100  # label of a token without loss (prompt, padding)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def prompt_text(row: Row, kind: Kind) -> str:
    return row["question"] if kind == "choice" else f"Question: {row['question']}\nAnswer:"


def tokenized(tokenizer: Any, prompt: str, target: str, *, max_length: int,
              eos: bool = False) -> tuple[list[int], list[int]]:
    """(ids, labels) of ``prompt + " " + target`` in at most `max_length` tokens: labels on the target only (and EOS
    with ``eos``), the prompt's start cut first."""
    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if eos:
        tail = tail + [tokenizer.eos_token_id]
    tail = tail[:max_length - 1]
    head = head[max(0, len(head) - (max_length - len(tail))):]
    return head + tail, [IGNORE] * len(head) + tail


def encode(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, max_length: int,
           eos: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + " " + target`` sequences, labels only on the target (and EOS with ``eos``)."""
    if not prompts:
        raise ValueError("nothing to encode: no examples")
    pairs = [tokenized(tokenizer, p, t, max_length=max_length, eos=eos) for p, t in zip(prompts, targets, strict=True)]
    sequences, labels = [ids for ids, _ in pairs], [lab for _, lab in pairs]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id

    def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    return {"input_ids": padded(sequences, pad), "attention_mask": padded([[1] * len(s) for s in sequences], 0),
            "labels": padded(labels, IGNORE)}


def pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of sequences packed into rows as wide as the longest one (first fit, longest first).

    Right-padding a batch to its longest sequence nearly doubles its tokens on ARC-Easy and PIQA (batches of 8:
    1.80x and 1.93x the real tokens); these rows hold 1.19x and 1.21x, and no row is wider than the padded batch, so
    attention costs no more per row."""
    width = max(lengths)
    rows: list[list[int]] = []
    filled: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, used in enumerate(filled) if used + lengths[i] <= width), None)
        if row is None:
            rows.append([])
            filled.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        filled[row] += lengths[i]
    return rows


def encode_packed(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, max_length: int,
                  eos: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The sequences of `encode`, several to a row (`pack_rows`): each restarts its positions at 0 and attends to
    itself only (a (rows, 1, T, T) additive mask in `dtype`, the model's activations': see `activation_dtype`).
    Every token's logits are those of its sequence alone, and the batch is a model input like any other, the
    model's own loss included (each sequence starts with an unlabelled token, so no label is predicted across a
    boundary)."""
    if not prompts:
        raise ValueError("nothing to encode: no examples")
    pairs = [tokenized(tokenizer, p, t, max_length=max_length, eos=eos) for p, t in zip(prompts, targets, strict=True)]
    rows = pack_rows([len(ids) for ids, _ in pairs])
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members):
            seq, lab = pairs[i]
            ids[r, at:at + len(seq)] = torch.tensor(seq)
            labels[r, at:at + len(seq)] = torch.tensor(lab)
            labels[r, at] = IGNORE  # nothing before it in its sequence predicts a sequence's first token
            positions[r, at:at + len(seq)] = torch.arange(len(seq))
            segments[r, at:at + len(seq)] = segment
            at += len(seq)
    mask = packed_attention_mask(segments, dtype, shared_prefix=False)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a batch that are not padding: the 2-D mask's ones, or for a packed batch's 4-D mask the tokens
    that see or are seen by another token (padding sees itself only, and a sequence holds at least a prompt token and
    a target token)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch["input_ids"].numel()
    if mask.dim() == 2:
        return int(mask.sum())
    allowed = mask[:, 0] == 0
    return int(((allowed.sum(-1) > 1) | (allowed.sum(-2) > 1)).sum())


def training_pairs(rows: Sequence[Row], kind: Kind) -> tuple[list[str], list[str]]:
    """(prompts, targets) a model learns from: the correct choice, or the worked answer."""
    targets = [row["choices"][row["label"]] if kind == "choice" else row["answer"] for row in rows]
    return [prompt_text(row, kind) for row in rows], targets


def lm_batches(tokenizer: Any, rows: Sequence[Row], *, kind: Kind, batch_size: int, seed: int, max_length: int,
               packed: bool = False, dtype: torch.dtype = torch.float32) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of answer-only training batches, reshuffled every epoch from `seed`: right-padded, or with
    `packed` several examples to a row (`encode_packed`, its mask in `dtype`): the same loss from fewer tokens."""
    for chunk in seeded_chunks(rows, batch_size=batch_size, seed=seed):
        prompts, targets = training_pairs(chunk, kind)
        eos = kind == "generation"
        yield (encode_packed(tokenizer, prompts, targets, max_length=max_length, eos=eos, dtype=dtype) if packed
               else encode(tokenizer, prompts, targets, max_length=max_length, eos=eos))


def target_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(token | everything before it) over each sequence's labelled tokens (full logits: the
    reference the position-only paths are tested against)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = at_least_float32(logits[:, :-1])
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Logits for a softmax: 16-bit ones upcast to float32, float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, LM head) of a causal LM whose logits are exactly head(decoder(...).last_hidden_state), or None.

    Computing the head only where a token is scored or trained on is the largest saving on a small LM: its
    vocabulary projection (49,152 x 576 on SmolLM2-135M) costs a fifth of the forward pass per position, and the
    log-softmax over the vocabulary at every position more. Models that post-process their logits (soft-capping,
    scaling) keep the full forward."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder, head


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of `batch` (mean token cross-entropy over its labels, as the model's own `.loss`),
    with the LM head computed only at the positions that predict a labelled token (see `split_head`)."""
    parts = split_head(model)
    if parts is None:
        return model(**batch).loss
    decoder, head = parts
    hidden = decoder(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return nn.functional.cross_entropy(at_least_float32(head(hidden[:, :-1][keep])), labels[keep])


@dataclass(frozen=True)
class PackedQuestion:
    """One prompt followed by all its choices in one sequence: each choice sees the prompt and itself only."""

    ids: list[int]  # prompt tokens, then each choice's tokens
    positions: list[int]  # the position each token would have in prompt + that choice alone
    segments: list[int]  # 0 for the prompt, i + 1 for choice i
    spans: list[tuple[int, int]]  # [start, end) of each choice in ids


def pack_question(tokenizer: Any, prompt: str, choices: Sequence[str], max_length: int) -> PackedQuestion:
    """Tokenise like `encode` (prompt and " " + choice separately), cutting the prompt's start so that the prompt and
    its longest choice fit in `max_length` tokens."""
    head = tokenizer(prompt)["input_ids"]
    tails = [tokenizer(" " + c, add_special_tokens=False)["input_ids"][:max_length - 1] for c in choices]
    head = head[max(0, len(head) - (max_length - max(len(t) for t in tails))):]
    ids, positions, segments, spans = list(head), list(range(len(head))), [0] * len(head), []
    for i, tail in enumerate(tails):
        spans.append((len(ids), len(ids) + len(tail)))
        ids += tail
        positions += range(len(head), len(head) + len(tail))
        segments += [i + 1] * len(tail)
    return PackedQuestion(ids, positions, segments, spans)


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's hidden states, which an additive attention mask must share (a float32 mask on a
    float64 model is silently mis-applied): its input embeddings', else its first floating parameter's."""
    try:
        return model.get_input_embeddings().weight.dtype
    except (AttributeError, NotImplementedError):
        return next(p for p in model.parameters() if p.is_floating_point()).dtype


def packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype, *, shared_prefix: bool = True) -> torch.Tensor:
    """Additive (batch, 1, T, T) mask for packed rows: a token attends to earlier tokens of its own segment and, with
    `shared_prefix`, of the prompt (segment 0); padding (segment -1) attends to itself only, so no row is empty.
    Built in at least float32 and returned in `dtype`, the model's activations' (`activation_dtype`)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    seen = ((k == q) | (k == 0)) if shared_prefix else k == q
    allowed = causal & seen & (q >= 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    wide = torch.promote_types(dtype, torch.float32)
    mask = torch.zeros(allowed.shape, dtype=wide, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(wide).min)[:, None].to(dtype)


def packed_logprobs(model: nn.Module, questions: Sequence[PackedQuestion], pad_id: int) -> list[list[float]]:
    """Per question, each choice's summed token log-likelihood, from one forward over the packed batch and the LM
    head at the scored positions only."""
    device = next(model.parameters()).device
    width = max(len(q.ids) for q in questions)
    ids = torch.full((len(questions), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)
    rows, at, targets = [], [], []
    for b, q in enumerate(questions):
        ids[b, :len(q.ids)] = torch.tensor(q.ids)
        positions[b, :len(q.ids)] = torch.tensor(q.positions)
        segments[b, :len(q.ids)] = torch.tensor(q.segments)
        prompt_end = q.spans[0][0]
        for start, end in q.spans:  # token j of a choice is predicted at the previous token of prompt + choice
            at += [prompt_end - 1] + list(range(start, end - 1))
            targets += q.ids[start:end]
            rows += [b] * (end - start)
    dtype = activation_dtype(model)
    mask = packed_attention_mask(segments.to(device), dtype)
    parts = split_head(model)
    rows_t, at_t = torch.tensor(rows, device=device), torch.tensor(at, device=device)
    inputs = dict(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device))
    if parts is None:
        logits = model(**inputs).logits[rows_t, at_t]
    else:
        decoder, head = parts
        logits = head(decoder(**inputs).last_hidden_state[rows_t, at_t])
    wanted = torch.tensor(targets, device=device)[:, None]
    picked = torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, wanted)[:, 0]
    out, cursor = [], 0
    for q in questions:
        sums = []
        for start, end in q.spans:
            sums.append(float(picked[cursor:cursor + end - start].sum()))
            cursor += end - start
        out.append(sums)
    return out


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, batch_tokens: int = 4096,
                  max_length: int = 512) -> list[list[float]]:
    """Per row, each choice's log-likelihood given the prompt divided by the choice's length in characters.

    Each question is one packed sequence (the prompt encoded once, every choice after it, see `pack_question`),
    questions are batched in order of length up to `batch_tokens` padded tokens per forward (the middle 90% of
    BoolQ's prompts span 263 to 1,220 characters), and the LM head runs only where a choice token is predicted."""
    packed = [pack_question(tokenizer, prompt_text(row, "choice"), row["choices"], max_length) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(packed[i].ids))
    scores: list[list[float]] = [[] for _ in rows]
    with _eval_mode(model):
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(packed[order[end]].ids) <= batch_tokens:
                end += 1
            chunk = order[start:end]
            for i, sums in zip(chunk, packed_logprobs(model, [packed[i] for i in chunk], tokenizer.pad_token_id)):
                scores[i] = [value / len(choice) for value, choice in zip(sums, rows[i]["choices"])]
            start = end
    return scores


def choice_hits(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, max_length: int = 512) -> list[bool]:
    """Per row, whether its highest length-normalised choice is the labelled one (ties: the first choice)."""
    if not rows:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    scores = choice_scores(model, tokenizer, rows, max_length=max_length)
    return [max(range(len(s)), key=s.__getitem__) == row["label"] for s, row in zip(scores, rows)]


def choice_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, max_length: int = 512) -> float:
    """Fraction of rows whose highest length-normalised choice is the labelled one."""
    hits = choice_hits(model, tokenizer, rows, max_length=max_length)
    return sum(hits) / len(hits)


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


def exact_match_hits(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, max_new_tokens: int = 256,
                     batch_size: int = 16, max_length: int = 512) -> list[bool]:
    """Per row, whether its greedy completion's final number equals the reference answer's."""
    if not rows:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    completions = generate(model, tokenizer, [prompt_text(row, "generation") for row in rows],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    return [(got := final_number(c)) is not None and got == final_number(row["answer"])
            for c, row in zip(completions, rows)]


def exact_match(model: nn.Module, tokenizer: Any, rows: Sequence[Row], **options: Any) -> float:
    """Fraction of rows whose greedy completion's final number equals the reference answer's."""
    hits = exact_match_hits(model, tokenizer, rows, **options)
    return sum(hits) / len(hits)


def lm_hits(model: nn.Module, tokenizer: Any, rows: Sequence[Row], kind: Kind, *,
            max_length: int = 512) -> list[bool]:
    """Per row, whether the model gets it right: the correct choice, or the exact final number."""
    if kind == "choice":
        return choice_hits(model, tokenizer, rows, max_length=max_length)
    return exact_match_hits(model, tokenizer, rows, max_length=max_length)


def lm_score(model: nn.Module, tokenizer: Any, rows: Sequence[Row], kind: Kind, *, max_length: int = 512) -> float:
    """The task's metric: choice accuracy or exact match."""
    hits = lm_hits(model, tokenizer, rows, kind, max_length=max_length)
    return sum(hits) / len(hits)


class _eval_mode:
    """Eval mode inside the block, the model's previous mode after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
