"""`svdtune bench`: can you beat LoRA? Every registered method, head to head, on a real model and real data.

Each method runs at the trainable-parameter budget of LoRA at `reference_rank` on the same target layers, wherever
its options allow matching it (its rank r is chosen so its count is closest); methods without a rank run at their
own size, and the table says so. Every run sees the same data split, the same number of steps and batches, the same
evaluation, and the same seeds. A run records score, trainable parameters, step time, tokens/s, peak memory, SVD/QR
init time (cold: no factor cache) and adapter file size; the untouched base model and a head-only run (only the task
head trains) are scored by the same code as references. Results go to results.json (resumable: finished runs are kept
and skipped), leaderboard.md (mean ± 95% CI over seeds, Δ vs LoRA) and pareto.png/.svg (score vs trainable
parameters).

Suites on a causal LM (`commonsense`, `math`) run every method on each of their tasks (multiple choice scored by
length-normalised log-likelihood, GSM8K by exact match of the final number; see `lmtasks`), train on the answer
tokens only, and have no head-only run; runs are keyed by (task, method, seed). Their data sets ship only validation
and test splits, so they train on a seeded 80% of those and score the other 20% (`evaldata.task_split`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .core import Adapter, weight_matrix
from .inject import resolve_targets
from .io import WEIGHTS_FILE, save_adapter
from .methods import METHODS, get_method
from .recipes import HEAD_ONLY, Loader, fine_tune_classifier, fine_tune_lm, load_causal_lm, load_classifier
from .lmtasks import lm_score
from .tasks import accuracy
from .train import TrainConfig

# Learning rates for these short runs (scale alpha/r = 1), from a coarse probe of 150 steps, seed 0, on the default
# suite (accuracy %: lora 1e-3 79.6, 3e-3 81.5; pissa 3e-4 77.3, 1e-3 80.0; olora 3e-4 76.4; lora_xs r=96 2e-4 77.6,
# 1e-3 76.7, 5e-3 collapsed to one class; svf 5e-3 74.4, 2e-2 78.6; head-only 1e-2 64.8). Residual methods start
# from large principal factors and want smaller steps (METHODS.md pitfall 4). Unknown methods get DEFAULT_LR; the
# task head always trains at HEAD_LR.
# svft (plain) is derived, not probed: its m_i moves σ_i additively where SVF's z_i moves it by σ_i·Δz_i, and MiniLM's
# median σ is 1.16 (benchmarks/results/spectrum-minilm), so SVF's 2e-2 maps to about 2e-2 (official scripts: 5e-2).
LEARNING_RATES = {"lora": 2e-3, "pissa": 1e-3, "milora": 2e-3, "olora": 5e-4, "lora_xs": 5e-4, "svf": 2e-2,
                  "svft": 2e-2, HEAD_ONLY: 1e-2,
                  # Adaptive rank. AdaLoRA and LoRA² start from λ = 0, so the update grows only as fast as λ and the
                  # factors move; probed at 100 steps, seed 0 (accuracy %: adalora 5e-3 61.8, 2e-2 80.2, 5e-2 80.2;
                  # lora2 5e-3 65.8, 2e-2 80.8, 5e-2 62.8). ALoRA has LoRA's init and scale, so LoRA's rate (derived).
                  "adalora": 2e-2, "lora2": 2e-2, "alora": 2e-3}
DEFAULT_LR = 1e-3
# Methods whose budget an r cannot match: LoRA²'s size is k (m + n) whatever r (r adds only 2rk + r), so matching by
# r would pick r = 1, a single triplet to prune; it runs at its defaults (r = k = 8), near LoRA r=8's budget.
OWN_OPTIONS: dict[str, dict[str, Any]] = {"lora2": {"r": 8}}
HEAD_LR = 1e-2
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Suite:
    name: str
    model: str  # embedded model name or local directory
    tasks: tuple[str, ...]  # data set names (see load_task); all classification, or all for a causal LM
    seeds: tuple[int, ...] = (0,)
    steps: int = 150  # optimizer steps per run
    batch_size: int = 16
    eval_size: int = 1000  # held-out examples scored per run
    reference_rank: int = 8  # the budget: LoRA at this rank on the same targets
    max_length: int = 64  # tokens per example (causal LM: prompt + answer; the prompt's start is cut first)
    methods: tuple[str, ...] = ()  # empty: every registered method
    extra_runs: tuple[tuple[str, dict[str, Any]], ...] = ()  # (method, options) at their own budget, e.g. small ranks


SUITES = {
    # LoRA-XS at r=8 shows the other end of the Pareto plot: 144x fewer trainable parameters than the matched budget.
    # 100 steps and 500 held-out sentences keep its 14 runs near 10 minutes on 2 CPU cores.
    "default": Suite(name="default", model="minilm-l6", tasks=("movie-reviews",), steps=100, eval_size=500,
                     extra_runs=(("lora_xs", {"r": 8}),)),
    # SmolLM2-135M, answer-only LM loss, scored on 500 held-out questions per task; long (hours on 2 CPU cores).
    "commonsense": Suite(name="commonsense", model="smollm2-135m", tasks=("arc-easy", "boolq", "piqa"), seeds=(0, 1, 2),
                         steps=200, batch_size=8, eval_size=500, max_length=256),
    "math": Suite(name="math", model="smollm2-135m", tasks=("gsm8k",), seeds=(0, 1, 2), steps=300, batch_size=4,
                  eval_size=250, max_length=384),
}
CLASSIFICATION = "classification"


def load_task(name: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of a named data set; the split is fixed (seed 0), so every run sees the same data."""
    if name != "movie-reviews":
        from .evaldata import task_split

        return task_split(name)
    from .data import movie_reviews, split

    return split(movie_reviews(), seed=0)


def task_kind(name: str) -> str:
    """"classification" (movie-reviews), else the benchmark's kind: "choice" or "generation"."""
    from .evaldata import task_kind as benchmark_kind

    return CLASSIFICATION if name == "movie-reviews" else benchmark_kind(name)


def score(model: torch.nn.Module, tokenizer: Any, rows: list[dict], kind: str, max_length: int) -> float:
    """The task's metric on `rows`: classification or choice accuracy, or exact match."""
    if kind == CLASSIFICATION:
        return accuracy(model, tokenizer, rows, max_length=max_length)
    return lm_score(model, tokenizer, rows, kind, max_length=max_length)


def matched_options(cls: type[Adapter], shapes: Sequence[tuple[int, int]], budget: int) -> dict[str, int] | None:
    """The rank r whose total trainable count is closest to `budget` (ties: the smaller r), or None without an r."""
    if "r" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return None
    limit = min(min(shape) for shape in shapes) - 1
    cost = {r: total_trainable(cls, shapes, cls.Config(r=r)) for r in range(1, limit + 1)}
    return {"r": min(cost, key=lambda r: (abs(cost[r] - budget), r))}


def total_trainable(cls: type[Adapter], shapes: Sequence[tuple[int, int]], config: Any) -> int:
    return sum(cls.count_trainable(m, n, config) for m, n in shapes)


def plan(suite: Suite, shapes: Sequence[tuple[int, int]], *,
         head_only: bool = True) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options) for every run of the suite: head-only (classifiers), each method at the budget, the
    extra runs."""
    budget = total_trainable(get_method("lora"), shapes, get_method("lora").Config(r=suite.reference_rank))
    runs: list[tuple[str, str, dict[str, Any]]] = [(HEAD_ONLY, HEAD_ONLY, {})] if head_only else []
    for name in suite.methods or tuple(METHODS):
        runs.append((name, name, OWN_OPTIONS.get(name) or matched_options(get_method(name), shapes, budget) or {}))
    for name, options in suite.extra_runs:
        if not suite.methods or name in suite.methods:
            label = f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})"
            runs.append((label, name, dict(options)))
    return runs


def run_one(suite: Suite, task: str, label: str, method: str, options: dict[str, Any], seed: int,
            data: tuple[list, list], load: Loader, progress: bool) -> dict[str, Any]:
    config = TrainConfig(steps=suite.steps, lr=LEARNING_RATES.get(method, DEFAULT_LR), head_lr=HEAD_LR)
    common = dict(seed=seed, batch_size=suite.batch_size, max_length=suite.max_length, eval_size=suite.eval_size,
                  load=load, progress=progress)
    kind = task_kind(task)
    run = (fine_tune_classifier(suite.model, data, method, options, config, **common) if kind == CLASSIFICATION
           else fine_tune_lm(suite.model, data, kind, method, options, config, **common))
    adapter_mb = 0.0
    if method != HEAD_ONLY:
        with tempfile.TemporaryDirectory() as tmp:
            adapter_mb = (save_adapter(run.model, Path(tmp) / "a") / WEIGHTS_FILE).stat().st_size / 1e6
    training = run.training
    return {"task": task, "label": label, "method": method, "options": options, "seed": seed, "score": run.score,
            "trainable": run.trainable, "lr": config.lr, "final_loss": training.final_loss,
            "step_seconds": training.median_step_seconds,
            "tokens_per_second": training.tokens_per_second, "peak_memory_mb": training.peak_memory_mb,
            "init_seconds": run.factor_seconds, "adapter_mb": adapter_mb, "train_seconds": training.seconds}


def environment() -> dict[str, Any]:
    """What a result depends on besides its settings: code version, library versions, machine."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    import transformers

    return {"git_sha": sha, "svdtune": __version__, "torch": torch.__version__, "transformers":
            transformers.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def run_suite(suite: Suite, out: Path, *, load: Loader | None = None,
              load_data: Callable[[str], tuple[list, list]] = load_task, resume: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Run every (task, method, seed) of the suite not already in out/results.json; write results, table and plot.

    `load(model, seed)` gives a fresh model and tokenizer (default: a classifier with a seeded head for
    classification tasks, the causal LM as published otherwise)."""
    kinds = {task: task_kind(task) for task in suite.tasks}
    classification = CLASSIFICATION in kinds.values()
    if classification and set(kinds.values()) != {CLASSIFICATION}:
        raise ValueError(f"suite {suite.name!r} mixes classification and causal-LM tasks ({kinds}); a suite trains "
                         "one kind of model: split it in two")
    load = load or (load_classifier if classification else load_causal_lm)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, Any] = {"suite": json.loads(json.dumps(dataclasses.asdict(suite))), "tasks": {}, "runs": []}
    if resume and results_file.exists():
        previous = json.loads(results_file.read_text())
        if previous.get("suite") == results["suite"]:
            results = previous
    data = {task: load_data(task) for task in suite.tasks}
    model, tokenizer = load(suite.model, suite.seeds[0])
    shapes = [tuple(weight_matrix(layer).shape) for layer in resolve_targets(model, None)[1].values()]
    for task, (train_rows, eval_rows) in data.items():
        if task not in results["tasks"]:  # the untouched model, scored by the same code: the zero-shot reference
            base = score(model, tokenizer, eval_rows[: suite.eval_size], kinds[task], suite.max_length)
            results["tasks"][task] = {"kind": kinds[task], "base_score": base, "split": {
                "train": len(train_rows), "eval": min(len(eval_rows), suite.eval_size), "seed": 0}}
    del model
    results["environment"] = environment()
    done = {(r["task"], r["label"], r["seed"]) for r in results["runs"]}
    for task in suite.tasks:
        for label, method, options in plan(suite, shapes, head_only=classification):
            for seed in suite.seeds:
                if (task, label, seed) in done:
                    continue
                results["runs"].append(run_one(suite, task, label, method, options, seed, data[task], load, progress))
                results_file.write_text(json.dumps(results, indent=2) + "\n")
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    (out / "leaderboard.md").write_text(leaderboard(results))
    pareto_plot(results, out / "pareto")
    return results


def aggregate(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per method on `task`: means over seeds, and the 95% CI half-width of the score (t distribution)."""
    rows = []
    runs_of_task = [r for r in results["runs"] if r["task"] == task]
    for label in dict.fromkeys(r["label"] for r in runs_of_task):
        runs = [r for r in runs_of_task if r["label"] == label]
        scores = [r["score"] for r in runs]
        half = (T_975.get(len(scores) - 1, 1.96) * statistics.stdev(scores) / math.sqrt(len(scores))
                if len(scores) > 1 else None)
        mean = {k: statistics.fmean(r[k] for r in runs) for k in
                ("score", "step_seconds", "tokens_per_second", "peak_memory_mb", "init_seconds", "adapter_mb")}
        rows.append({"label": label, "method": runs[0]["method"], "options": runs[0]["options"],
                     "trainable": runs[0]["trainable"], "seeds": len(runs), "ci": half, **mean})
    return rows


METRICS = {CLASSIFICATION: "accuracy", "choice": "accuracy", "generation": "exact match"}
BASE_NOTE = {CLASSIFICATION: "random head", "choice": "zero-shot", "generation": "zero-shot, greedy"}


def leaderboard(results: dict[str, Any]) -> str:
    suite = results["suite"]
    lines = [f"## svdtune bench: suite {suite['name']} ({suite['model']}, {suite['steps']} steps x batch "
             f"{suite['batch_size']} per run)\n",
             f"Budget: LoRA r={suite['reference_rank']} on the same targets"
             + ("; the task head trains in every run and is not counted." if HEAD_ONLY in
                {r["label"] for r in results["runs"]} else ".")]
    for task, info in results["tasks"].items():
        rows = aggregate(results, task)
        lora = next((r["score"] for r in rows if r["label"] == "lora"), None)
        metric = METRICS[info["kind"]]
        split = info["split"]
        source = ("" if info["kind"] == CLASSIFICATION else " Only validation/test examples ship with this data set: "
                  "train and held-out rows are a seeded 80/20 split of them, not the official test set.")
        lines += [f"\n### {task}: {split['eval']} held-out examples ({split['train']} to train on, split seed "
                  f"{split['seed']})\n",
                  f"Untouched base model ({BASE_NOTE[info['kind']]}): {100 * info['base_score']:.1f}% {metric}."
                  f"{source}\n",
                  f"| method | options | trainable | {metric} % (±95% CI) | Δ vs LoRA | step s | tokens/s | peak MB | "
                  "SVD/QR init s | adapter MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r["score"]):
            ci = f" ± {100 * r['ci']:.1f}" if r["ci"] is not None else ""
            delta = f"{100 * (r['score'] - lora):+.1f}" if lora is not None else "n/a"
            options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
            lines.append(f"| {r['label']} | {options} | {r['trainable']:,} | {100 * r['score']:.1f}{ci} | {delta} | "
                         f"{r['step_seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['peak_memory_mb']:.0f} | "
                         f"{r['init_seconds']:.2f} | {r['adapter_mb']:.2f} |")
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines.append(f"\nSeeds: {', '.join(map(str, seeds))}. git {results['environment']['git_sha'][:10]}, torch "
                 f"{results['environment']['torch']}, {results['environment']['cpus']} CPUs "
                 f"({results['environment']['device']}).")
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict[str, Any], stem: Path) -> None:
    """Per task: score vs trainable parameters (log x) with CI bars, the Pareto frontier, and the reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(len(tasks), 1, figsize=(9, 4.5 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        info = results["tasks"][task]
        everything = aggregate(results, task)
        rows = [r for r in everything if r["trainable"] > 0]
        for r in rows:  # a legend entry per run: labels of runs at one budget would overlap as annotations
            ax.errorbar(r["trainable"], 100 * r["score"], yerr=100 * r["ci"] if r["ci"] else None, fmt="o",
                        capsize=3, label=f"{r['label']} ({100 * r['score']:.1f}%)")
        frontier, best = [], -1.0
        for r in sorted(rows, key=lambda r: r["trainable"]):
            if r["score"] > best:
                frontier.append(r)
                best = r["score"]
        ax.step([r["trainable"] for r in frontier], [100 * r["score"] for r in frontier], where="post", alpha=0.4,
                label="Pareto frontier")
        ax.axhline(100 * info["base_score"], linestyle=":", color="grey", label="base model")
        head = [r for r in everything if r["label"] == HEAD_ONLY]
        if head:
            ax.axhline(100 * head[0]["score"], linestyle="--", color="grey", label="head only")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale" + (", task head excluded)" if head else ")"))
        ax.set_ylabel(f"{METRICS[info['kind']]} %")
        ax.set_title(f"svdtune bench: {results['suite']['model']} on {task}")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=120)
    plt.close(fig)
