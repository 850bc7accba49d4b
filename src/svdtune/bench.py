"""`svdtune bench`: can you beat LoRA, and with 10x fewer trainable parameters? Every method, on one protocol.

What runs (`plan`): LoRA at `reference_rank` (the reference) and the suite's small-rank LoRA, every registered
method at LoRA's trainable-parameter budget on the same target layers wherever its options allow matching it (its
rank r is chosen so its count is closest), methods without a rank (SVF, SVFT) and the extra runs at their own sizes,
and reference rows: full fine-tuning and PEFT's own LoRA/PiSSA/AdaLoRA (`references`), a head-only run for
classifiers, and the untouched base model, scored by the same code.

How it is decided (`protocol`): for each configuration, `lr_points` learning rates around its default are trained
with the first seed and scored on a validation split carved from the training rows; the best picks the rate; the
final runs train at that rate with every seed and score the held-out split, keeping each example's outcome. Δ vs
LoRA and its 95% interval come from the paired outcomes (same seeds, same examples), with a verdict per row and one
generated sentence answering the question. The seed-0 final run is the grid run at the chosen rate (same seed, data
and steps), scored on the held-out split only once the choice is made.

Results go to results.json after every run (resumable: finished grid points and final runs are kept and skipped),
leaderboard.md, and per task pareto.png/.svg (score vs trainable parameters) and delta.png/.svg (Δ vs LoRA).
Causal-LM data sets ship only validation and test splits, so they train on a seeded 80% of those and score the
other 20% (`evaldata.task_split`); every table says so.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .allocate import AllocationConfig
from .core import Adapter, weight_matrix
from .inject import resolve_targets
from .io import WEIGHTS_FILE, save_adapter
from .methods import METHODS, get_method
from .protocol import (PairedDifference, answer, carve_validation, choose_rate, learning_rate_grid, outcomes,
                       paired_difference, rate_rank, verdict)
from .recipes import CLASSIFICATION, HEAD_ONLY, FineTuneResult, Loader, fine_tune, hits, load_causal_lm, \
    load_classifier
from .references import FULL, RATE_OF, is_reference
from .suites import SUITES, Suite
from .train import TrainConfig

# The centre of each method's learning-rate grid (scale alpha/r = 1). From probes on the default suite (150 steps,
# seed 0, accuracy %: lora 1e-3 79.6, 3e-3 81.5; pissa 3e-4 77.3, 1e-3 80.0; olora 3e-4 76.4; lora_xs r=96 2e-4
# 77.6, 1e-3 76.7, 5e-3 collapsed; svf 5e-3 74.4, 2e-2 78.6; adalora 5e-3 61.8, 2e-2 80.2; lora2 5e-3 65.8, 2e-2
# 80.8): residual methods start from large principal factors and want smaller steps; AdaLoRA and LoRA² grow their
# update from λ = 0 and want larger ones. svft is derived from svf (its m_i moves σ_i additively, SVF's z_i by
# σ_i·Δz_i, and the weights' median σ is near 1), alora shares LoRA's init and scale, full fine-tuning takes the
# usual 2e-5. These only centre the grid: the rate of every reported run is chosen on validation data.
LEARNING_RATES = {"lora": 2e-3, "pissa": 1e-3, "milora": 2e-3, "olora": 5e-4, "lora_xs": 5e-4, "svf": 2e-2,
                  "svft": 2e-2, "adalora": 2e-2, "lora2": 2e-2, "alora": 2e-3, HEAD_ONLY: 1e-2, FULL: 2e-5}
DEFAULT_LR = 1e-3
HEAD_LR = 1e-2  # the classifier head's rate in every classification run (not part of the grid)
# Methods whose budget an r cannot match: LoRA²'s size is k (m + n) whatever r (r adds only 2rk + r), so matching by
# r would pick r = 1, a single triplet to prune; it runs at k = 8 (LoRA r=8's budget) with r = 2k = 16 triplets, the
# smallest r whose planes can be orthogonal.
OWN_OPTIONS: dict[str, dict[str, Any]] = {"lora2": {"r": 16, "k": 8}}
REFERENCE = "lora"
BASE = "base model"


def load_task(name: str) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of a named data set; the split is fixed (seed 0), so every run sees the same data."""
    if name != "movie-reviews":
        from .evaldata import task_split

        return task_split(name)
    from .data import movie_reviews, split

    return split(movie_reviews(), seed=0)


def task_kind(name: str) -> str:
    """"classification" (movie-reviews), else the benchmark's kind: "choice" or "generation"."""
    from .evaldata import task_kind as benchmark_kind

    return CLASSIFICATION if name == "movie-reviews" else benchmark_kind(name)


def matched_options(cls: type[Adapter], shapes: Sequence[tuple[int, int]], budget: int) -> dict[str, int] | None:
    """The rank r whose total trainable count is closest to `budget` (ties: the smaller r), or None without an r."""
    if "r" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return None
    limit = min(min(shape) for shape in shapes) - 1
    cost = {r: total_trainable(cls, shapes, cls.Config(r=r)) for r in range(1, limit + 1)}
    return {"r": min(cost, key=lambda r: (abs(cost[r] - budget), r))}


def total_trainable(cls: type[Adapter], shapes: Sequence[tuple[int, int]], config: Any) -> int:
    return sum(cls.count_trainable(m, n, config) for m, n in shapes)


def label_of(method: str, options: dict[str, Any]) -> str:
    return f"{method} ({', '.join(f'{k}={v}' for k, v in options.items())})"


def plan(suite: Suite, shapes: Sequence[tuple[int, int]], *,
         head_only: bool = True) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options) for every configuration of the suite: LoRA at the reference rank first, then the
    other methods at its budget, the extra runs, the references, and head-only (classifiers). A suite's `methods`
    selects among registered methods and references alike."""
    budget = total_trainable(get_method("lora"), shapes, get_method("lora").Config(r=suite.reference_rank))
    names = [n for n in suite.methods if n in METHODS] if suite.methods else list(METHODS)
    runs = [(name, name, OWN_OPTIONS.get(name) or matched_options(get_method(name), shapes, budget) or {})
            for name in sorted(names, key=lambda n: n != REFERENCE)]
    runs += [(label_of(name, options), name, dict(options)) for name, options in suite.extra_runs
             if not suite.methods or name in suite.methods]
    runs += [(name, name, {}) for name in suite.references if not suite.methods or name in suite.methods]
    return runs + ([(HEAD_ONLY, HEAD_ONLY, {})] if head_only else [])


def center_rate(method: str) -> float:
    return LEARNING_RATES.get(RATE_OF.get(method, method), DEFAULT_LR)


def adapter_megabytes(run: FineTuneResult, method: str) -> float | None:
    """Size of the saved svdtune adapter (None for references and head-only, which save no svdtune adapter)."""
    if method == HEAD_ONLY or is_reference(method):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return (save_adapter(run.model, Path(tmp) / "a") / WEIGHTS_FILE).stat().st_size / 1e6


@dataclass
class Context:
    """What every run of one task shares."""

    suite: Suite
    task: str
    kind: str
    fit_rows: list[dict]  # training rows without the validation split
    validation: list[dict]
    held_out: list[dict]
    load: Loader
    progress: bool


def train_one(ctx: Context, method: str, options: dict[str, Any], lr: float, seed: int) -> FineTuneResult:
    suite = ctx.suite
    allocation = AllocationConfig(**dict(suite.allocation))
    config = TrainConfig(steps=suite.steps, lr=lr, head_lr=HEAD_LR, allocation=allocation)
    return fine_tune(suite.model, ctx.fit_rows, ctx.kind, method, options, config, seed=seed,
                     batch_size=suite.batch_size, max_length=suite.max_length, precision=suite.precision,
                     reference_rank=suite.reference_rank, load=ctx.load, progress=ctx.progress)


def record(ctx: Context, label: str, method: str, options: dict[str, Any], lr: float, seed: int,
           run: FineTuneResult, stage: str, rows: list[dict]) -> dict[str, Any]:
    """A run's entry in results.json: its settings, costs and score on `rows` (validation or held-out)."""
    got = hits(run.model, run.tokenizer, rows, ctx.kind, ctx.suite.max_length)
    training = run.training
    entry = {"task": ctx.task, "label": label, "method": method, "options": options, "stage": stage, "seed": seed,
             "lr": lr, "score": sum(got) / len(got), "trainable": run.trainable, "final_loss": training.final_loss,
             "step_seconds": training.median_step_seconds, "tokens_per_second": training.tokens_per_second,
             "peak_memory_mb": training.peak_memory_mb, "init_seconds": run.factor_seconds,
             "adapter_mb": adapter_megabytes(run, method), "train_seconds": training.seconds}
    if stage == "final":
        entry["outcomes"] = outcomes(got)
    return entry


def run_configuration(ctx: Context, label: str, method: str, options: dict[str, Any], results: dict[str, Any],
                      save: Callable[[], None]) -> None:
    """The grid on validation (first seed), then the final runs at the chosen rate on the held-out split."""
    suite = ctx.suite
    mine = [r for r in results["runs"] if r["task"] == ctx.task and r["label"] == label]
    grid = learning_rate_grid(center_rate(method), suite.lr_points, suite.lr_spacing)
    validation = {r["lr"]: r["score"] for r in mine if r["stage"] == "grid"}
    best: tuple[float, FineTuneResult] | None = None
    for lr in grid:
        if lr in validation:
            continue
        run = train_one(ctx, method, options, lr, suite.seeds[0])
        results["runs"].append(record(ctx, label, method, options, lr, suite.seeds[0], run, "grid", ctx.validation))
        validation[lr] = results["runs"][-1]["score"]
        save()
        center = center_rate(method)
        if best is None or rate_rank(lr, validation[lr], center) > rate_rank(best[0], validation[best[0]], center):
            best = (lr, run)  # only the running best can be chosen: the others are released
        del run
    chosen = choose_rate({lr: validation[lr] for lr in grid}, center_rate(method))
    finished = {r["seed"] for r in mine if r["stage"] == "final"}
    for seed in suite.seeds:
        if seed in finished:
            continue
        reuse = seed == suite.seeds[0] and best is not None and best[0] == chosen
        run = best[1] if reuse else train_one(ctx, method, options, chosen, seed)
        results["runs"].append(record(ctx, label, method, options, chosen, seed, run, "final", ctx.held_out)
                               | {"from_grid": reuse})
        save()
        best = None if reuse else best


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
            "processor": cpu_name(), "bf16_units": bf16_units(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def bf16_units() -> list[str]:
    """The CPU's bf16 matrix instructions (AMX, AVX-512 BF16) from /proc/cpuinfo: what makes a bf16 base fast here."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({"amx_bf16", "avx512_bf16"} & set(flags.split(":", 1)[1].split()))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_suite(suite: Suite, out: Path, *, load: Loader | None = None,
              load_data: Callable[[str], tuple[list, list]] = load_task, resume: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Run every configuration of the suite not already in out/results.json; write results, table and plots.

    `load(model, seed)` gives a fresh model and tokenizer (default: a classifier with a seeded head for
    classification tasks, the causal LM as published otherwise)."""
    kinds = {task: task_kind(task) for task in suite.tasks}
    classification = CLASSIFICATION in kinds.values()
    if classification and set(kinds.values()) != {CLASSIFICATION}:
        raise ValueError(f"suite {suite.name!r} mixes classification and causal-LM tasks ({kinds}); a suite trains "
                         "one kind of model: split it in two")
    load = load or (load_classifier if classification else load_causal_lm)
    if not classification:
        load = loaded_once(load)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, Any] = {"suite": json.loads(json.dumps(dataclasses.asdict(suite))), "tasks": {}, "runs": []}
    if resume and results_file.exists():
        previous = json.loads(results_file.read_text())
        if previous.get("suite") == results["suite"]:
            results = previous

    machine = environment()  # once per suite: a git call and /proc reads, not once per saved run

    def save() -> None:
        results["environment"] = machine
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    data = {task: load_data(task) for task in suite.tasks}
    model, tokenizer = load(suite.model, suite.seeds[0])
    shapes = [tuple(weight_matrix(layer).shape) for layer in resolve_targets(model, None)[1].values()]
    contexts = {}
    for task, (train_rows, eval_rows) in data.items():
        fit_rows, validation = carve_validation(train_rows, suite.validation_size, seed=0)
        held_out = eval_rows[: suite.eval_size]
        contexts[task] = Context(suite, task, kinds[task], fit_rows, validation, held_out, load, progress)
        if task not in results["tasks"]:  # the untouched model, scored by the same code: the zero-shot reference
            base = hits(model.to(torch.bfloat16 if suite.precision == "bf16" and not classification else torch.float32),
                        tokenizer, held_out, kinds[task], suite.max_length)
            results["tasks"][task] = {"kind": kinds[task], "base_score": sum(base) / len(base),
                                      "base_outcomes": outcomes(base), "split": {
                                          "train": len(fit_rows), "validation": len(validation),
                                          "eval": len(held_out), "seed": 0}}
            save()
    del model
    for task in suite.tasks:
        for label, method, options in plan(suite, shapes, head_only=classification):
            run_configuration(contexts[task], label, method, options, results, save)
    save()
    write_report(results, out)
    return results


def write_report(results: dict[str, Any], out: Path) -> None:
    """leaderboard.md and each task's plots from `results` (also for a suite still running: `--report-only`)."""
    (out / "leaderboard.md").write_text(leaderboard(results))
    for task in results["tasks"]:
        if any(r["task"] == task and r["stage"] == "final" for r in results["runs"]):
            stem = out if len(results["tasks"]) == 1 else out / task
            stem.mkdir(exist_ok=True)
            plot_task(results, task, stem)


def loaded_once(load: Loader) -> Loader:
    """A causal-LM loader that loads each model once and hands out copies: nothing in such a model depends on the
    seed, and parsing and dequantising a GGUF checkpoint costs more than a short run's scoring."""
    loaded: dict[str, tuple[torch.nn.Module, Any]] = {}

    def copy_of(name: str, seed: int) -> tuple[torch.nn.Module, Any]:
        if name not in loaded:
            loaded[name] = load(name, seed)
        model, tokenizer = loaded[name]
        return copy.deepcopy(model), tokenizer

    return copy_of


def aggregate(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per configuration on `task` from its final runs: mean score with a bootstrap 95% interval (over seeds
    and examples), Δ vs LoRA paired by seed and example with its interval and verdict, the grid and chosen rate, and
    mean costs. The untouched base model is a row too (its outcomes paired with every seed)."""
    info = results["tasks"][task]
    finals = [r for r in results["runs"] if r["task"] == task and r["stage"] == "final"]
    grids = [r for r in results["runs"] if r["task"] == task and r["stage"] == "grid"]
    by_label: dict[str, list[dict]] = {}
    for r in finals:
        by_label.setdefault(r["label"], []).append(r)
    reference = {r["seed"]: r["outcomes"] for r in by_label.get(REFERENCE, [])}
    rows = []
    for label, runs in by_label.items():
        mine = {r["seed"]: r["outcomes"] for r in runs}
        row = summary_row(mine, reference)
        costs = {k: mean_of([r[k] for r in runs]) for k in
                 ("step_seconds", "tokens_per_second", "peak_memory_mb", "init_seconds", "adapter_mb")}
        row.update(label=label, method=runs[0]["method"], options=runs[0]["options"], trainable=runs[0]["trainable"],
                   lr=runs[0]["lr"], grid={str(g["lr"]): g["score"] for g in grids if g["label"] == label}, **costs)
        rows.append(row)
    base = summary_row({s: info["base_outcomes"] for s in (reference or {0: None})}, reference)
    rows.append({**base, "label": BASE, "method": BASE, "options": {}, "trainable": 0, "lr": None, "grid": {},
                 **dict.fromkeys(("step_seconds", "tokens_per_second", "peak_memory_mb", "init_seconds",
                                  "adapter_mb"))})
    return rows


def summary_row(mine: dict[int, str], reference: dict[int, str]) -> dict[str, Any]:
    zeros = {s: "0" * len(o) for s, o in mine.items()}
    score = paired_difference(mine, zeros)  # the score itself, with the same bootstrap
    row: dict[str, Any] = {"score": score.mean, "score_low": score.low, "score_high": score.high, "seeds": len(mine)}
    if reference and set(mine) & set(reference):
        diff: PairedDifference = paired_difference(mine, reference)
        row.update(delta=diff.mean, delta_low=diff.low, delta_high=diff.high, verdict=verdict(diff))
    else:
        row.update(delta=None, delta_low=None, delta_high=None, verdict=None)
    return row


def mean_of(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


METRICS = {CLASSIFICATION: "accuracy", "choice": "accuracy", "generation": "exact match"}
BASE_NOTE = {CLASSIFICATION: "random head", "choice": "zero-shot", "generation": "zero-shot, greedy"}


def leaderboard(results: dict[str, Any]) -> str:
    suite = results["suite"]
    seeds = ", ".join(map(str, suite["seeds"]))
    lines = [f"## svdtune bench: suite {suite['name']} ({suite['model']}, {suite['steps']} steps x batch "
             f"{suite['batch_size']} per run, {suite['precision']} base)\n",
             f"Protocol: each configuration's learning rate is chosen from {suite['lr_points']} rates (factor "
             f"{suite['lr_spacing']:g} apart, around its default) trained with seed {suite['seeds'][0]} and scored "
             f"on {suite['validation_size']} validation rows carved from the training rows; the final runs train at "
             f"that rate with seeds {seeds} and score the held-out split. Δ vs LoRA r={suite['reference_rank']} is "
             "paired (same seeds, same examples) with a bootstrap 95% interval over seeds and examples; the verdict "
             "is better/worse only when the interval excludes 0. Budget: LoRA r="
             f"{suite['reference_rank']} on the same targets"
             + ("; the task head trains in every run and is not counted." if any(
                 r["label"] == HEAD_ONLY for r in results["runs"]) else ".")]
    if len(suite["seeds"]) == 1:
        lines.append("\nOne seed: the intervals cover the sampling of held-out examples, not the run-to-run spread "
                     "of training; `--suite default-full` runs three.")
    for task, info in results["tasks"].items():
        rows = aggregate(results, task)
        metric = METRICS[info["kind"]]
        split = info["split"]
        source = ("" if info["kind"] == CLASSIFICATION else " Only validation/test examples ship with this data set: "
                  "train and held-out rows are a seeded 80/20 split of them, not the official test set.")
        lines += [f"\n### {task}: {split['eval']} held-out examples ({split['train']} to train on, "
                  f"{split['validation']} for validation, split seed {split['seed']})\n",
                  f"Untouched base model ({BASE_NOTE[info['kind']]}): {100 * info['base_score']:.1f}% {metric}."
                  f"{source}\n",
                  f"| method | options | trainable | {metric} % [95% CI] | Δ vs LoRA [95% CI] | verdict | lr (grid: "
                  "validation %) | step s | tokens/s | peak MB | init s | adapter MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r["score"]):
            lines.append(table_line(r))
        lora = next((r for r in rows if r["label"] == REFERENCE), None)
        if lora is not None:
            lines.append("\n" + answer(rows, reference=f"LoRA r={suite['reference_rank']}",
                                       reference_trainable=lora["trainable"], task=task))
    env = results.get("environment", {})
    lines.append(f"\ngit {env.get('git_sha', '?')[:10]}, torch {env.get('torch')}, {env.get('processor')}, "
                 f"{env.get('cpus')} CPUs ({env.get('device')}).")
    return "\n".join(lines) + "\n"


def table_line(r: dict[str, Any]) -> str:
    def pct(x: float | None, signed: bool = False) -> str:
        return "n/a" if x is None else f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"

    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
    delta = ("-" if r["delta"] is None or r["label"] == REFERENCE else
             f"{pct(r['delta'], True)} [{pct(r['delta_low'], True)}, {pct(r['delta_high'], True)}]")
    grid = ", ".join(f"{float(lr):.2g}: {100 * v:.1f}" for lr, v in r["grid"].items())
    rate = "-" if r["lr"] is None else f"{r['lr']:.2g} ({grid})"
    return (f"| {r['label']} | {options} | {r['trainable']:,} | {pct(r['score'])} [{pct(r['score_low'])}, "
            f"{pct(r['score_high'])}] | {delta} | {'reference' if r['label'] == REFERENCE else r['verdict'] or '-'} | "
            f"{rate} | {num(r['step_seconds'], '.3f')} | {num(r['tokens_per_second'], '.0f')} | "
            f"{num(r['peak_memory_mb'], '.0f')} | {num(r['init_seconds'], '.2f')} | {num(r['adapter_mb'], '.2f')} |")


MARKERS = "os^Dv<>pP*XhH8d"


def plot_task(results: dict[str, Any], task: str, stem: Path) -> None:
    """pareto.png/.svg (score vs trainable parameters, log x, 95% intervals, the Pareto frontier, base and head-only
    lines) and delta.png/.svg (Δ vs LoRA with its paired interval per configuration), one marker and colour each."""
    from .plotting import save_figure, subplots

    info = results["tasks"][task]
    rows = aggregate(results, task)
    style = {r["label"]: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, r in enumerate(rows)}
    fig, ax = subplots(figsize=(9, 5))
    trained = [r for r in rows if r["trainable"] > 0]
    for r in trained:
        marker, colour = style[r["label"]]
        ax.errorbar(r["trainable"], 100 * r["score"], yerr=[[100 * (r["score"] - r["score_low"])],
                                                            [100 * (r["score_high"] - r["score"])]],
                    fmt=marker, color=colour, capsize=3, label=f"{r['label']} ({100 * r['score']:.1f}%)")
    frontier, best = [], -1.0
    for r in sorted(trained, key=lambda r: r["trainable"]):
        if r["score"] > best:
            frontier.append(r)
            best = r["score"]
    ax.step([r["trainable"] for r in frontier], [100 * r["score"] for r in frontier], where="post", alpha=0.3,
            color="black", label="Pareto frontier")
    ax.axhline(100 * info["base_score"], linestyle=":", color="grey", label="base model")
    head = [r for r in rows if r["label"] == HEAD_ONLY]
    if head:
        ax.axhline(100 * head[0]["score"], linestyle="--", color="grey", label="head only")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale" + (", task head excluded)" if head else ")"))
    ax.set_ylabel(f"{METRICS[info['kind']]} % (95% CI)")
    ax.set_title(f"svdtune bench: {results['suite']['model']} on {task}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    save_figure(fig, stem / "pareto")
    paired = sorted((r for r in rows if r["delta"] is not None and r["label"] != REFERENCE), key=lambda r: r["delta"])
    if not paired:
        return
    fig, ax = subplots(figsize=(8, 0.4 * len(paired) + 1.5))
    colours = {"better": "tab:green", "tie": "tab:grey", "worse": "tab:red"}
    for y, r in enumerate(paired):
        ax.errorbar(100 * r["delta"], y, xerr=[[100 * (r["delta"] - r["delta_low"])],
                                               [100 * (r["delta_high"] - r["delta"])]],
                    fmt=style[r["label"]][0], color=colours[r["verdict"]], capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(paired)), [f"{r['label']} ({r['trainable']:,})" for r in paired], fontsize=8)
    ax.set_xlabel(f"Δ {METRICS[info['kind']]} vs LoRA r={results['suite']['reference_rank']}, points "
                  "(paired 95% CI; green better, red worse, grey tie)")
    ax.set_title(f"{task}: each configuration against LoRA")
    save_figure(fig, stem / "delta")
