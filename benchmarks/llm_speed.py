"""What each change to the causal-LM suite buys, as ratios from one interleaved run on SmolLM2-135M with LoRA r=8.

Scoring multiple choice (ARC-Easy and PIQA held-out questions):
  per-choice   every prompt + choice its own sequence, full logits (how choices were scored before packing)
  packed       one sequence per question (the prompt encoded once, every choice after it) and the LM head only
               where a choice token is predicted (`causal_lm.choice_scores`)
Training step (batch 8 of ARC-Easy answers):
  full head    the model's own loss: logits and log-softmax at every position
  answer head  `causal_lm.answer_loss`: the LM head at labelled positions only
  packed rows  the answer head on the same batch packed several examples to a row (`causal_lm.encode_packed`), as
               fine-tuning trains: the right-padded batch is 1.8x its real tokens, the packed one 1.2x
each with the base in float32, in float32 under bf16 autocast, and held in bf16 (adapters float32).

The agreement columns check that the faster paths choose the same answers (packed vs per-choice in one precision)
and that a bf16 base scores like a float32 one.

    python benchmarks/llm_speed.py [--questions 60] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from harness import markdown_table, medians, time_interleaved, write_result

import svdtune
from svdtune.data.causal_lm import (
    activation_dtype,
    answer_loss,
    choice_scores,
    encode,
    lm_batches,
    prompt_text,
    target_logprobs,
)
from svdtune.data.models import load_model
from svdtune.data.tasks import get_task


def per_choice_scores(model: torch.nn.Module, tokenizer, rows: list[dict], batch_size: int = 32) -> list[list[float]]:
    """The unpacked reference: every prompt + choice scored as a sequence of its own, full logits."""
    pairs = [(i, prompt_text(row, "choice"), c) for i, row in enumerate(rows) for c in row["choices"]]
    scores: list[list[float]] = [[] for _ in rows]
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = encode(tokenizer, [p for _, p, _ in chunk], [c for _, _, c in chunk], max_length=512)
            for (i, _, c), lp in zip(chunk, target_logprobs(model, batch)):
                scores[i].append(float(lp) / len(c))
    return scores


def picks(scores: list[list[float]]) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def adapted(dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    model, tokenizer = load_model("smollm2-135m")
    model.to(dtype)
    torch.manual_seed(0)
    svdtune.adapt(model, "lora", r=8, verbose=False, progress=False)
    return model.eval(), tokenizer


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=60, help="held-out questions scored per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/llm_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models = {"float32": adapted(torch.float32), "bf16 base": adapted(torch.bfloat16)}
    tokenizer = models["float32"][1]
    tasks = {task: get_task(task).load()[1][:args.questions] for task in ("arc-easy", "piqa")}
    calls: dict[str, Callable[[], object]] = {}
    for precision, (model, _) in models.items():
        for task, rows in tasks.items():
            calls[f"score {task}, {precision}, per-choice"] = lambda m=model, r=rows: per_choice_scores(m, tokenizer, r)
            calls[f"score {task}, {precision}, packed"] = lambda m=model, r=rows: choice_scores(m, tokenizer, r)
    train_rows = get_task("arc-easy").load()[0]
    batch = next(lm_batches(tokenizer, train_rows, kind="choice", batch_size=8, seed=0, max_length=128))
    packed = {precision: next(lm_batches(tokenizer, train_rows, kind="choice", batch_size=8, seed=0, max_length=128,
                                         packed=True, dtype=activation_dtype(model)))
              for precision, (model, _) in models.items()}
    for label, (model, _), cast in (("float32", models["float32"], False), ("float32 + bf16 autocast",
                                    models["float32"], True), ("bf16 base", models["bf16 base"], False)):
        rows_of = packed["bf16 base" if label == "bf16 base" else "float32"]
        for head, loss_of, data in (("full head", lambda m, b: m(**b).loss, batch), ("answer head", answer_loss, batch),
                                    ("packed rows", answer_loss, rows_of)):
            def step(m=model, c=cast, f=loss_of, b=data) -> None:
                m.train()
                with autocast(c):
                    loss = f(m, b)
                loss.backward()
                m.zero_grad(set_to_none=True)
            calls[f"train step, {label}, {head}"] = step
    times = medians(time_interleaved(calls, warmup=1, rounds=args.rounds, per_round=1))
    agreement = {}
    for task, rows in tasks.items():
        reference = picks(per_choice_scores(models["float32"][0], tokenizer, rows))
        for precision, (model, _) in models.items():
            packed = picks(choice_scores(model, tokenizer, rows))
            agreement[f"{task}, {precision}"] = {
                "packed = per-choice": sum(a == b for a, b in zip(packed, picks(per_choice_scores(model, tokenizer,
                                                                                                  rows)))) / len(rows),
                "= float32 per-choice": sum(a == b for a, b in zip(packed, reference)) / len(rows),
                "accuracy": sum(p == row["label"] for p, row in zip(packed, rows)) / len(rows)}
    rows_out = []
    for precision in models:
        for task in tasks:
            slow, fast = times[f"score {task}, {precision}, per-choice"], times[f"score {task}, {precision}, packed"]
            a = agreement[f"{task}, {precision}"]
            rows_out.append([f"scoring {task} ({args.questions} questions)", precision, "per-choice → packed",
                             f"{slow / fast:.2f}x faster", f"{a['packed = per-choice']:.3f}",
                             f"{a['= float32 per-choice']:.3f}", f"{100 * a['accuracy']:.1f}"])
    base = times["train step, float32, full head"]
    for label in ("float32", "float32 + bf16 autocast", "bf16 base"):
        for head in ("full head", "answer head", "packed rows"):
            rows_out.append(["training step (8 ARC-Easy answers)", label, head,
                             f"{times[f'train step, {label}, {head}'] / base:.2f}x float32 full head", "", "", ""])
    table = markdown_table(["what", "precision", "path", "time ratio", "same picks as per-choice",
                            "same picks as float32", "accuracy %"], rows_out)
    settings = {"questions": args.questions, "rounds": args.rounds, "device": "cpu",
                "wall_seconds": round(time.perf_counter() - start)}
    write_result(args.out, "llm_speed", settings, {"median_seconds": times, "agreement": agreement}, table)


if __name__ == "__main__":
    main()
