"""One real commonsense run, to size the `commonsense` suite: the untouched SmolLM2-135M's zero-shot accuracy on the
held-out splits of ARC-Easy, BoolQ and PIQA, and LoRA r=8 fine-tuned on ARC-Easy, with wall times.

    python benchmarks/commonsense_probe.py [--steps 60] [--eval-size 200] [--threads 1] [--parts base,lora]
        [--out benchmarks/results/commonsense-probe.json]

Held-out rows are the first `--eval-size` of each data set's seeded 20% split (`svdtune.evaldata.task_split`; only
validation/test examples ship, so this is not the official test set). Settings other than steps and eval size are
the `commonsense` suite's. Writes JSON (settings, versions, git sha, machine, scores, seconds) after every part.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from svdtune.bench import LEARNING_RATES, SUITES, environment, load_task, score, task_kind
from svdtune.recipes import fine_tune_lm, load_causal_lm
from svdtune.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default="base,lora", help="base (zero-shot scores), lora (the ARC-Easy run)")
    parser.add_argument("--out", default="benchmarks/results/commonsense-probe.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES["commonsense"]
    report = {"settings": {**vars(args), "model": suite.model, "batch_size": suite.batch_size,
                           "max_length": suite.max_length, "lr": LEARNING_RATES["lora"]},
              "environment": environment(), "base": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    model, tokenizer = load_causal_lm(suite.model, 0)
    for task in suite.tasks if "base" in parts else ():
        eval_rows = load_task(task)[1][:args.eval_size]
        start = time.perf_counter()
        accuracy = score(model, tokenizer, eval_rows, task_kind(task), suite.max_length)
        report["base"][task] = {"accuracy": accuracy, "eval_examples": len(eval_rows),
                                "seconds": time.perf_counter() - start}
        print(task, report["base"][task], flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    del model
    if "lora" not in parts:
        return

    start = time.perf_counter()
    config = TrainConfig(steps=args.steps, lr=LEARNING_RATES["lora"])
    run = fine_tune_lm(suite.model, load_task("arc-easy"), "choice", "lora", {"r": suite.reference_rank}, config,
                       seed=0, batch_size=suite.batch_size, max_length=suite.max_length, eval_size=args.eval_size)
    report["lora_arc_easy"] = {"accuracy": run.score, "trainable": run.trainable, "steps": args.steps,
                               "train_seconds": run.training.seconds, "median_step_seconds":
                               run.training.median_step_seconds, "tokens_per_second": run.training.tokens_per_second,
                               "first_loss": run.training.losses[0], "final_loss": run.training.final_loss,
                               "total_seconds": time.perf_counter() - start}
    print("lora arc-easy", report["lora_arc_easy"], flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
