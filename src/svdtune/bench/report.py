"""The leaderboard and plots of a suite's results: aggregated rows, paired Δ vs LoRA, verdicts and the answer."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..data.tasks import get_task
from ..train.recipes import HEAD_ONLY
from .protocol import BETTER, WORSE, PairedDifference, answer, holm, paired_difference, verdict

REFERENCE = "lora"
BASE = "base model"


def write_report(results: dict[str, Any], out: Path) -> None:
    """leaderboard.md and each task's plots from `results` (also for a suite still running: `--report-only`)."""
    (out / "leaderboard.md").write_text(leaderboard(results))
    for task in results["tasks"]:
        if any(r["task"] == task and r["stage"] == "final" for r in results["runs"]):
            stem = out if len(results["tasks"]) == 1 else out / task
            stem.mkdir(exist_ok=True)
            plot_task(results, task, stem)


def aggregate(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per configuration on `task` from its final runs: mean score with a bootstrap 95% interval (over seeds
    and examples), Δ vs LoRA paired by seed and example with its interval and verdict, the grid and chosen rate, and
    mean costs. The untouched base model is a row too (its outcomes paired with every seed)."""
    info = results["tasks"][task]
    grids = [r for r in results["runs"] if r["task"] == task and r["stage"] == "grid"]
    by_label = {label: list(runs.values()) for label, runs in final_outcomes(results, task).items()}
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
    family = {r["label"]: r["p"] for r in rows if r["label"] != REFERENCE and r["delta"] is not None}
    survivors = holm(family)
    for r in rows:
        if r["label"] in family:
            r["family_wise"] = r["label"] in survivors
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
        row.update(delta=diff.mean, delta_low=diff.low, delta_high=diff.high, verdict=verdict(diff), p=diff.p)
    else:
        row.update(delta=None, delta_low=None, delta_high=None, verdict=None, p=None)
    return row


def mean_of(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None




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
             "is better/worse only when the interval excludes 0, and says \"not after Holm\" when it does not "
             "survive Holm's correction for all of the table's comparisons with LoRA (family-wise 5%). Budget: LoRA r="
             f"{suite['reference_rank']} on the same targets"
             + ("; the task head trains in every run and is not counted." if any(
                 r["label"] == HEAD_ONLY for r in results["runs"]) else ".")]
    allocation = dict(suite.get("allocation") or ())
    if allocation:
        settings = ", ".join(f"{k}={v}" for k, v in allocation.items())
        lines.append(f"\nRank allocation of the adaptive-rank methods: {settings} "
                     "(`svdtune.allocate.AllocationConfig`)."
                     + (" ALoRA's importance is its ablation scores' first-order estimate from the gate gradients, "
                        "not the exact ablations." if allocation.get("ablation") == "first_order" else ""))
    if len(suite["seeds"]) == 1:
        lines.append("\nOne seed: the intervals cover the sampling of held-out examples, not the run-to-run spread "
                     "of training; `--suite default-full` runs three.")
    for task, info in results["tasks"].items():
        rows = aggregate(results, task)
        spec = get_task(task)
        metric = spec.metric
        split = info["split"]
        source = f" {spec.split_note}" if spec.split_note else ""
        lines += [f"\n### {task}: {split['eval']} held-out examples ({split['train']} to train on, "
                  f"{split['validation']} for validation, split seed {split['seed']})\n",
                  f"Untouched base model ({spec.base_note}): {100 * info['base_score']:.1f}% {metric}."
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
        lines.append("\n" + stage_times(results, task))
    env = results.get("environment", {})
    lines.append(f"\ngit {env.get('git_sha', '?')[:10]}, torch {env.get('torch')}, {env.get('processor')}, "
                 f"{env.get('cpus')} CPUs ({env.get('device')}).")
    machines = Counter(r.get("machine", "not recorded") for r in results["runs"])
    if "wall_seconds" in results:
        lines.append(f"Wall time of the runs: {results['wall_seconds'] / 60:.1f} min (summed over the invocations that "
                     "made them; configurations run side by side overlap, so it is less than the compute above).")
    if len(machines) == 1:
        lines.append(f"Every run timed on: {next(iter(machines))}.")
    elif len(machines) > 1:
        lines.append("Runs were timed on several machines or code versions (step s, tokens/s and init s compare only "
                     "within one): " + "; ".join(f"{m}: {n} runs" for m, n in machines.items()) + ".")
    return "\n".join(lines) + "\n"


def stage_times(results: dict[str, Any], task: str) -> str:
    """One line: the compute each stage of a task took, summed over its runs (initialisation, training, scoring; a
    final run taken from the grid adds only its scoring). Runs saved before scoring was timed are counted apart."""
    spent = {"grid": 0.0, "final": 0.0}
    untimed = 0
    for r in results["runs"]:
        if r["task"] != task:
            continue
        if not r.get("from_grid"):
            spent[r["stage"]] += (r.get("init_seconds") or 0.0) + (r.get("train_seconds") or 0.0)
        if r.get("score_seconds") is None:
            untimed += 1
        else:
            spent[r["stage"]] += r["score_seconds"]
    note = f" (scoring not timed for {untimed} runs saved before it was)" if untimed else ""
    return (f"Compute spent: learning-rate grid {spent['grid'] / 60:.1f} min, final runs {spent['final'] / 60:.1f} min"
            f"{note}.")


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
    judged = "reference" if r["label"] == REFERENCE else f"{r['verdict']} (not after Holm)" if not_after_holm(r) else (
        r["verdict"] or "-")
    return (f"| {r['label']} | {options} | {r['trainable']:,} | {pct(r['score'])} [{pct(r['score_low'])}, "
            f"{pct(r['score_high'])}] | {delta} | {judged} | "
            f"{rate} | {num(r['step_seconds'], '.3f')} | {num(r['tokens_per_second'], '.0f')} | "
            f"{num(r['peak_memory_mb'], '.0f')} | {num(r['init_seconds'], '.2f')} | {num(r['adapter_mb'], '.2f')} |")


MARKERS = "os^Dv<>pP*XhH8d"
# 18 distinct colours (tab10, then Dark2's eight), so a suite's configurations (16 with the references) never share one
COLOURS = [f"C{i}" for i in range(10)] + ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
                                           "#a6761d", "#666666"]


def plot_task(results: dict[str, Any], task: str, stem: Path) -> None:
    """pareto.png/.svg (score vs trainable parameters, log x, 95% intervals, the Pareto frontier, base and head-only
    lines) and delta.png/.svg (Δ vs LoRA with its paired interval per configuration), one marker and colour each."""
    from ..plotting import save_figure, subplots

    info = results["tasks"][task]
    rows = aggregate(results, task)
    style = {r["label"]: (MARKERS[i % len(MARKERS)], COLOURS[i % len(COLOURS)]) for i, r in enumerate(rows)}
    fig, ax = subplots(figsize=(9, 5))
    trained = [r for r in rows if r["trainable"] > 0]
    for r, x in zip(trained, spread([r["trainable"] for r in trained], [r["score"] for r in trained])):
        marker, colour = style[r["label"]]
        ax.errorbar(x, 100 * r["score"], yerr=[[100 * (r["score"] - r["score_low"])],
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
    ax.set_xlabel("trainable parameters (log scale" + (", task head excluded" if head else "")
                  + "; configurations of one budget spread sideways, lowest score left)")
    ax.set_ylabel(f"{get_task(task).metric} % (95% CI)")
    ax.set_title(f"svdtune bench: {results['suite']['model']} on {task}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    save_figure(fig, stem / "pareto")
    paired = sorted((r for r in rows if r["delta"] is not None and r["label"] != REFERENCE), key=lambda r: r["delta"])
    if not paired:
        return
    fig, ax = subplots(figsize=(8, 0.4 * len(paired) + 1.5))
    colours = {"better": "tab:green", "tie": "tab:grey", "worse": "tab:red"}
    pale = {"better": "#98df8a", "worse": "#ff9896"}  # a verdict that does not survive Holm's correction
    trained_paired = [r for r in paired if r["label"] != BASE]
    low = min([100 * r["delta_low"] for r in trained_paired] + [0.0])
    high = max([100 * r["delta_high"] for r in trained_paired] + [0.0])
    margin = 0.08 * (high - low) or 1.0
    left = low - margin  # the untouched model, often far below every trained row, must not squeeze their intervals
    for y, r in enumerate(paired):
        colour = pale[r["verdict"]] if not_after_holm(r) else colours[r["verdict"]]
        if r["label"] == BASE and 100 * r["delta_low"] < left and trained_paired:
            ax.annotate(f"{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]",
                        xy=(left, y), xytext=(left + 1.5 * margin, y), va="center", fontsize=8, color=colour,
                        arrowprops={"arrowstyle": "->", "color": colour})
            continue
        ax.errorbar(100 * r["delta"], y, xerr=[[100 * (r["delta"] - r["delta_low"])],
                                               [100 * (r["delta_high"] - r["delta"])]],
                    fmt=style[r["label"]][0], color=colour, capsize=3)
    if trained_paired:
        ax.set_xlim(left, high + margin)
    ax.set_ylim(-0.7, len(paired) - 0.3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(paired)), [f"{r['label']} ({r['trainable']:,})" for r in paired], fontsize=8)
    ax.set_xlabel(f"Δ {get_task(task).metric} vs LoRA r={results['suite']['reference_rank']}, points "
                  "(paired 95% CI; green better, red worse, grey tie; pale: not after Holm)")
    ax.set_title(f"{task}: each configuration against LoRA")
    save_figure(fig, stem / "delta")


def not_after_holm(row: dict[str, Any]) -> bool:
    """Whether a row's better/worse verdict holds by its own interval only, not after Holm's correction."""
    return row["verdict"] in (BETTER, WORSE) and row.get("family_wise") is False


def spread(counts: list[int], scores: list[float], step: float = 1.08, close: float = 1.05) -> list[float]:
    """x positions for the Pareto plot (log axis): configurations whose trainable counts lie within a factor `close`
    of each other (every rank-based method at LoRA's budget) are spread sideways by factors of `step` around their
    group's geometric centre, lowest score left, so that their intervals do not hide each other; a configuration
    alone at its size stays at its count."""
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and counts[i] <= close * counts[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    x = [float(c) for c in counts]
    for group in (g for g in groups if len(g) > 1):
        centre = math.exp(sum(math.log(counts[i]) for i in group) / len(group))
        for j, i in enumerate(sorted(group, key=lambda i: (scores[i], i))):
            x[i] = centre * step ** (j - (len(group) - 1) / 2)
    return x


def final_outcomes(results: dict[str, Any], task: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{label: {seed: final run}} of one task."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results["runs"]:
        if r["task"] == task and r["stage"] == "final":
            found.setdefault(r["label"], {})[r["seed"]] = r
    return found


def precision_comparison(low: dict[str, Any], high: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configuration that two suites both ran on a task (say the bf16 `llm` suite and `llm-float32`): the score
    difference low − high precision paired by seed and held-out example, with its 95% interval and verdict, and the
    ratio of their tokens/s. Pairing needs the same examples, so a task whose held-out split differs is refused."""
    rows = []
    for task in sorted(set(low["tasks"]) & set(high["tasks"])):
        if low["tasks"][task]["split"] != high["tasks"][task]["split"]:
            raise ValueError(f"{task}: the two suites score different splits ({low['tasks'][task]['split']} vs "
                             f"{high['tasks'][task]['split']}); their runs cannot be paired")
        mine, theirs = final_outcomes(low, task), final_outcomes(high, task)
        for label in [lb for lb in mine if lb in theirs]:
            seeds = sorted(set(mine[label]) & set(theirs[label]))
            if not seeds:
                continue
            diff = paired_difference({s: mine[label][s]["outcomes"] for s in seeds},
                                     {s: theirs[label][s]["outcomes"] for s in seeds})
            speed = [mean_of([runs[s]["tokens_per_second"] for s in seeds]) for runs in (mine[label], theirs[label])]
            rows.append({"task": task, "label": label, "seeds": len(seeds),
                         "low": mean_of([mine[label][s]["score"] for s in seeds]),
                         "high": mean_of([theirs[label][s]["score"] for s in seeds]),
                         "delta": diff.mean, "delta_low": diff.low, "delta_high": diff.high, "verdict": verdict(diff),
                         "speed_ratio": speed[0] / speed[1] if speed[0] and speed[1] else None,
                         "machines": sorted({r.get("machine", "not recorded") for runs in (mine[label], theirs[label])
                                             for r in runs.values()})})
    return rows


def precision_table(rows: list[dict[str, Any]], low: str, high: str) -> str:
    """Markdown of `precision_comparison` rows."""
    lines = [f"| task | configuration | seeds | {low} % | {high} % | Δ {low} − {high} [95% CI] | verdict | "
             f"tokens/s {low} / {high} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}x"
        lines.append(f"| {r['task']} | {r['label']} | {r['seeds']} | {100 * r['low']:.1f} | {100 * r['high']:.1f} | "
                     f"{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}] | "
                     f"{r['verdict']} | {ratio} |")
    machines = sorted({m for r in rows for m in r["machines"]})
    lines.append(f"\nTimed on: {'; '.join(machines)}." + (" The speed ratio compares runs timed on different machines "
                 "or code versions: read it with care." if len(machines) > 1 else ""))
    return "\n".join(lines) + "\n"
