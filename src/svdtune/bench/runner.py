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

Results go to results.json after every run (resumable: finished grid points and final runs are kept and skipped;
a file of another protocol is refused, never overwritten, see `resumed_results`), leaderboard.md, and per task
pareto.png/.svg (score vs trainable parameters) and delta.png/.svg (Δ vs LoRA).
Causal-LM data sets ship only validation and test splits, so they train on a seeded 80% of those and score the
other 20% (`data.evalsets.task_split`); every table says so. What each task is (kind, data, metric) comes from the
task registry (`data.tasks`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..allocate import AllocationConfig
from ..core import Adapter, weight_matrix
from ..data.tasks import CLASSIFICATION, Task, get_task
from ..inject import resolve_targets
from ..io import saved_bytes
from ..methods import METHODS, get_method
from ..train.loop import TrainConfig
from ..train.recipes import HEAD_ONLY, FineTuneResult, Loader, fine_tune, hits, load_causal_lm, load_classifier
from ..train.references import FULL, RATE_OF, check_installed, is_reference
from .machine import environment, machine_label
from .parallel import Work, check_picklable, run_in_workers, threads_per_job
from .protocol import carve_validation, choose_rate, learning_rate_grid, outcomes, rate_rank
from .report import REFERENCE, write_report
from .suites import Suite

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
    runs += [(name, name, {}) for name in chosen_references(suite)]
    return runs + ([(HEAD_ONLY, HEAD_ONLY, {})] if head_only else [])


def chosen_references(suite: Suite) -> list[str]:
    """The suite's reference runs that its `methods` (when given) select."""
    return [name for name in suite.references if not suite.methods or name in suite.methods]


def center_rate(method: str) -> float:
    return LEARNING_RATES.get(RATE_OF.get(method, method), DEFAULT_LR)


def adapter_megabytes(run: FineTuneResult, method: str) -> float | None:
    """Size of the saved svdtune adapter (None for references and head-only, which save no svdtune adapter)."""
    if method == HEAD_ONLY or is_reference(method):
        return None
    return saved_bytes(run.model) / 1e6


@dataclass
class Context:
    """What every run of one task shares."""

    suite: Suite
    task: Task
    fit_rows: list[dict]  # training rows without the validation split
    validation: list[dict]
    held_out: list[dict]
    load: Loader
    progress: bool
    machine: str  # where this session's runs are timed (`machine.machine_label`), kept with every run


def train_one(ctx: Context, method: str, options: dict[str, Any], lr: float, seed: int) -> FineTuneResult:
    suite = ctx.suite
    allocation = AllocationConfig(**dict(suite.allocation))
    config = TrainConfig(steps=suite.steps, lr=lr, head_lr=HEAD_LR, allocation=allocation)
    return fine_tune(suite.model, ctx.fit_rows, ctx.task, method, options, config, seed=seed,
                     batch_size=suite.batch_size, max_length=suite.max_length, precision=suite.precision,
                     reference_rank=suite.reference_rank, load=ctx.load, progress=ctx.progress)


def record(ctx: Context, label: str, method: str, options: dict[str, Any], lr: float, seed: int,
           run: FineTuneResult, stage: str, rows: list[dict]) -> dict[str, Any]:
    """A run's entry in results.json: its settings, costs and score on `rows` (validation or held-out)."""
    started = time.perf_counter()
    got = hits(run.model, run.tokenizer, rows, ctx.task.kind, ctx.suite.max_length)
    scored = time.perf_counter() - started
    training = run.training
    entry = {"task": ctx.task.name, "label": label, "method": method, "options": options, "stage": stage, "seed": seed,
             "lr": lr, "score": sum(got) / len(got), "trainable": run.trainable, "final_loss": training.final_loss,
             "step_seconds": training.median_step_seconds, "tokens_per_second": training.tokens_per_second,
             "peak_memory_mb": training.peak_memory_mb, "init_seconds": run.factor_seconds,
             "adapter_mb": adapter_megabytes(run, method), "train_seconds": training.seconds,
             "score_seconds": scored, "machine": ctx.machine}
    if stage == "final":
        entry["outcomes"] = outcomes(got)
    return entry


def run_configuration(ctx: Context, label: str, method: str, options: dict[str, Any], done: list[dict[str, Any]],
                      emit: Callable[[dict[str, Any]], None]) -> None:
    """The grid on validation (first seed), then the final runs at the chosen rate on the held-out split. `done`:
    this configuration's runs already finished (skipped); `emit` saves each new run as soon as it is scored."""
    suite = ctx.suite
    grid = learning_rate_grid(center_rate(method), suite.lr_points, suite.lr_spacing)
    validation = {r["lr"]: r["score"] for r in done if r["stage"] == "grid"}
    best: tuple[float, FineTuneResult] | None = None
    for lr in grid:
        if lr in validation:
            continue
        run = train_one(ctx, method, options, lr, suite.seeds[0])
        entry = record(ctx, label, method, options, lr, suite.seeds[0], run, "grid", ctx.validation)
        validation[lr] = entry["score"]
        emit(entry)
        center = center_rate(method)
        if best is None or rate_rank(lr, validation[lr], center) > rate_rank(best[0], validation[best[0]], center):
            best = (lr, run)  # only the running best can be chosen: the others are released
        del run
    chosen = choose_rate({lr: validation[lr] for lr in grid}, center_rate(method))
    finished = {r["seed"] for r in done if r["stage"] == "final"}
    for seed in suite.seeds:
        if seed in finished:
            continue
        reuse = seed == suite.seeds[0] and best is not None and best[0] == chosen
        run = best[1] if reuse else train_one(ctx, method, options, chosen, seed)
        emit(record(ctx, label, method, options, chosen, seed, run, "final", ctx.held_out) | {"from_grid": reuse})
        best = None if reuse else best


def runs_left(suite: Suite, method: str, done: list[dict[str, Any]]) -> int:
    """How many runs a configuration still has to train or score (for the progress bar)."""
    grid = learning_rate_grid(center_rate(method), suite.lr_points, suite.lr_spacing)
    scored = {r["lr"] for r in done if r["stage"] == "grid"}
    finals = {r["seed"] for r in done if r["stage"] == "final"}
    return sum(lr not in scored for lr in grid) + sum(seed not in finals for seed in suite.seeds)


@dataclass(frozen=True)
class Setup:
    """What every configuration of a suite shares, picklable so that worker processes can rebuild their contexts."""

    suite: Suite
    rows: dict[str, tuple[list[dict], list[dict], list[dict]]]  # task: (fit rows, validation, held-out)
    load: Loader
    causal_lm: bool
    progress: bool
    machine: str


_SHARED_LOADERS: dict[Loader, Loader] = {}


def context_for(setup: Setup, task: str) -> Context:
    """The context of `task`'s runs. A causal LM is loaded once per process and suite, and copied (`loaded_once`)."""
    load = setup.load
    if setup.causal_lm:
        load = _SHARED_LOADERS.setdefault(load, loaded_once(load))
    fit_rows, validation, held_out = setup.rows[task]
    return Context(setup.suite, get_task(task), fit_rows, validation, held_out, load, setup.progress, setup.machine)


def run_suite(suite: Suite, out: Path, *, load: Loader | None = None,
              load_data: Callable[[str], tuple[list, list]] | None = None, resume: bool = True,
              progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Run every configuration of the suite not already in out/results.json; write results, table and plots.

    `load(model, seed)` gives a fresh model and tokenizer (default: a classifier with a seeded head for
    classification tasks, the causal LM as published otherwise); `load_data(task name)` gives its (train, held-out)
    rows (default: the registered task's own split). `jobs` > 1 trains that many configurations at a time in worker
    processes, each with its share of the threads (`parallel`); `load` must then be a module-level function."""
    tasks = {name: get_task(name) for name in suite.tasks}
    kinds = {name: task.kind for name, task in tasks.items()}
    classification = CLASSIFICATION in kinds.values()
    if classification and set(kinds.values()) != {CLASSIFICATION}:
        raise ValueError(f"suite {suite.name!r} mixes classification and causal-LM tasks ({kinds}); a suite trains "
                         "one kind of model: split it in two")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    check_installed(chosen_references(suite))
    load = load or (load_classifier if classification else load_causal_lm)
    if jobs > 1:
        check_picklable(load)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, Any] = {"suite": json.loads(json.dumps(dataclasses.asdict(suite))), "tasks": {}, "runs": []}
    if resume and results_file.exists():
        results = resumed_results(json.loads(results_file.read_text()), results["suite"], results_file)

    machine = environment()  # once per suite: a git call and /proc reads, not once per saved run
    machine.update(jobs=jobs, threads=threads_per_job(jobs))  # what each run was timed with

    def save() -> None:
        results["environment"] = machine
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    data = {name: load_data(name) if load_data else task.load() for name, task in tasks.items()}
    rows = {}
    for task, (train_rows, eval_rows) in data.items():
        fit_rows, validation = carve_validation(train_rows, suite.validation_size, seed=0)
        rows[task] = (fit_rows, validation, eval_rows[: suite.eval_size])
    setup = Setup(suite, rows, load, not classification, progress and jobs == 1, machine_label(machine))
    _SHARED_LOADERS.clear()  # a model is kept for one suite's runs in a process, not beyond
    model, tokenizer = context_for(setup, suite.tasks[0]).load(suite.model, suite.seeds[0])
    shapes = [tuple(weight_matrix(layer).shape) for layer in resolve_targets(model, None)[1].values()]
    for task, (fit_rows, validation, held_out) in rows.items():
        if task not in results["tasks"]:  # the untouched model, scored by the same code: the zero-shot reference
            base = hits(model.to(torch.bfloat16 if suite.precision == "bf16" and not classification else torch.float32),
                        tokenizer, held_out, kinds[task], suite.max_length)
            results["tasks"][task] = {"kind": kinds[task], "base_score": sum(base) / len(base),
                                      "base_outcomes": outcomes(base), "split": {
                                          "train": len(fit_rows), "validation": len(validation),
                                          "eval": len(held_out), "seed": 0}}
            save()
    del model
    works = [Work(task, label, method, options, [r for r in results["runs"] if r["task"] == task and r["label"] == label])
             for task in suite.tasks for label, method, options in plan(suite, shapes, head_only=classification)]
    started = time.perf_counter()
    total = sum(runs_left(suite, work.method, work.done) for work in works)
    with tqdm(total=total, desc=f"{suite.name}: runs ({jobs} at a time)", unit="run",
              disable=not progress or jobs == 1) as bar:
        def emit(entry: dict[str, Any]) -> None:
            results["runs"].append(entry)
            save()
            bar.set_postfix_str(f"{entry['task']} {entry['label']} {entry['stage']}", refresh=False)
            bar.update()

        if jobs == 1:
            for work in works:
                run_configuration(context_for(setup, work.task), work.label, work.method, work.options, work.done,
                                  emit)
        else:
            _SHARED_LOADERS.clear()  # the workers load their own copies
            run_in_workers(works, jobs, functools.partial(context_for, setup), run_configuration, emit)
    _SHARED_LOADERS.clear()
    wall = time.perf_counter() - started
    if total:
        results["wall_seconds"] = results.get("wall_seconds", 0.0) + wall
    save()
    write_report(results, out)
    if progress and total:
        print(f"{total} runs in {wall / 60:.1f} min of wall time ({machine_label(machine)})")
    return results


# Suite fields that only say which runs to do: a results file written with other values of these still holds runs
# of the same protocol, so a resume keeps them. Every other field (model, steps, grid, splits, precision, allocation,
# the first seed, which trains the grid) changes what a finished run means.
SCOPE_FIELDS = ("description", "methods", "seeds", "extra_runs", "references")


def protocol_of(suite: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in suite.items() if k not in SCOPE_FIELDS} | {"first seed": suite["seeds"][0]}


def merged(previous: list, current: list) -> list:
    return previous + [item for item in current if item not in previous]


def resumed_results(previous: dict[str, Any], suite: dict[str, Any], path: Path) -> dict[str, Any]:
    """The finished runs of `path` to resume from, under a suite entry that covers both invocations (seeds, methods,
    extra runs and references merged: a run with `--methods lora` then the whole suite keeps every run). A file of
    another protocol is refused rather than overwritten: its runs cannot be mixed with the new ones."""
    before = previous.get("suite", {})
    if "seeds" in before:
        old, new = protocol_of(before), protocol_of(suite)
        changed = sorted(k for k in new if old.get(k) != new[k])
    else:
        changed = ["suite"]
    if changed:
        raise ValueError(f"{path} holds runs of another protocol (it differs in {', '.join(changed)}): resuming would "
                         "mix incomparable runs. Pass --fresh to start over (that file is then replaced) or --out to "
                         "write elsewhere")
    scope = {"description": suite["description"], "seeds": merged(before["seeds"], suite["seeds"]),
             "methods": [] if not before["methods"] or not suite["methods"] else merged(before["methods"],
                                                                                       suite["methods"]),
             "extra_runs": merged(before["extra_runs"], suite["extra_runs"]),
             "references": merged(before["references"], suite["references"])}
    return {**previous, "suite": {**suite, **scope}}


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


