"""The benchmark protocol: how a fair "can you beat LoRA?" is decided, independent of models and methods.

1. A validation split is carved out of the training rows (`carve_validation`); the held-out split is never seen
   before the final runs.
2. Every method gets the same number of learning rates, spaced geometrically around its own default
   (`learning_rate_grid`); each is trained with the first seed and scored on the validation split only, and the best
   validation score picks the rate (`choose_rate`, ties to the rate nearest the default).
3. The final runs train at the chosen rate with every seed and score the held-out split, keeping each example's
   outcome, so a comparison with LoRA is paired: same seeds, same examples (`paired_difference`, a bootstrap over
   seeds and examples). The verdict is "better" or "worse" only when the 95% interval excludes 0 (`verdict`).
4. A table compares a dozen or more configurations with LoRA, so about one in twenty ties would look "better" or
   "worse" by chance at 95% each. Every verdict is also checked for the whole table with Holm's step-down correction
   (`holm`, family-wise 5%, on p-values from the bootstrap's standard error), and the table and answer say which
   verdicts survive it.
5. One sentence answers the question from the table (`answer`).

Outcomes are stored as strings of "0"/"1", one character per held-out example, in the order of the split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

Row = TypeVar("Row")
BETTER, TIE, WORSE = "better", "tie", "worse"


def carve_validation(train: Sequence[Row], size: int, *, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train without the validation rows, validation rows): `size` rows drawn with `random.Random(seed)`, the rest in
    their original order. The held-out split is not an argument: it cannot leak into the choice."""
    if not 0 < size < len(train):
        raise ValueError(f"a validation split of {size} rows needs more than {size} training rows, got {len(train)}")
    chosen = set(random.Random(seed).sample(range(len(train)), size))
    return ([row for i, row in enumerate(train) if i not in chosen],
            [row for i, row in enumerate(train) if i in chosen])


def learning_rate_grid(center: float, points: int, spacing: float) -> list[float]:
    """`points` rates spaced by a factor `spacing`, centred on `center` in log scale (points=3, spacing=3:
    center/3, center, 3 center)."""
    if points < 1 or not spacing > 1:
        raise ValueError(f"a learning-rate grid needs points >= 1 and spacing > 1, got {points}, {spacing}")
    return [float(f"{center * spacing ** (k - (points - 1) / 2):.3g}") for k in range(points)]


def choose_rate(validation: dict[float, float], center: float) -> float:
    """The rate with the best validation score; ties go to the rate nearest `center` in log scale."""
    if not validation:
        raise ValueError("no grid results to choose a learning rate from")
    return max(validation, key=lambda lr: rate_rank(lr, validation[lr], center))


def rate_rank(lr: float, score: float, center: float) -> tuple[float, float]:
    """The order `choose_rate` maximises: validation score, then closeness to the default in log scale."""
    return score, -abs(math.log(lr / center))


def outcomes(hits: Sequence[bool]) -> str:
    return "".join("1" if h else "0" for h in hits)


@dataclass(frozen=True)
class PairedDifference:
    """Mean score difference (method − reference) over paired seeds and examples, with a bootstrap 95% interval."""

    mean: float
    low: float
    high: float
    seeds: int
    examples: int
    p: float  # two-sided p-value of Δ = 0: normal approximation with the bootstrap's standard error


def paired_difference(method: dict[int, str], reference: dict[int, str], *, resamples: int = 2000,
                      seed: int = 0) -> PairedDifference:
    """Δ = method − reference from outcome strings keyed by seed, on the seeds both have.

    The interval resamples seeds and examples independently with replacement (a two-level bootstrap): it covers the
    run-to-run spread of training and the sampling of held-out examples, so one table can call a difference. With a
    single seed it is the paired bootstrap over examples alone. The p-value (for `holm`) takes the bootstrap means'
    standard deviation as Δ's standard error: smooth where the interval's tails would need far more resamples."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        raise ValueError("no seed in common between the method's and the reference's final runs: nothing to pair")
    lengths = {len(method[s]) for s in seeds} | {len(reference[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"paired runs scored different numbers of examples ({sorted(lengths)}): not the same split")
    d = np.array([[int(a) - int(b) for a, b in zip(method[s], reference[s])] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    S, N = d.shape
    means = np.empty(resamples)
    for k in range(resamples):
        rows = rng.integers(0, S, S)
        cols = rng.integers(0, N, N)
        means[k] = d[np.ix_(rows, cols)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    mean, error = float(d.mean()), float(means.std(ddof=1))
    p = math.erfc(abs(mean) / error / math.sqrt(2)) if error > 0 else float(mean == 0)
    return PairedDifference(mean, float(low), float(high), S, N, p)


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> set[str]:
    """The names whose null hypothesis Holm's step-down procedure rejects at family-wise level `alpha`: sorted by
    p-value, the i-th smallest (from 0) is rejected while p <= alpha / (k - i), and the first that is not stops it."""
    rejected: set[str] = set()
    for i, (name, p) in enumerate(sorted(pvalues.items(), key=lambda item: item[1])):
        if p > alpha / (len(pvalues) - i):
            break
        rejected.add(name)
    return rejected


def verdict(diff: PairedDifference) -> str:
    """"better" / "worse" when the 95% interval excludes 0, "tie" otherwise."""
    if diff.low > 0:
        return BETTER
    if diff.high < 0:
        return WORSE
    return TIE


def _clause(names: Sequence[str], one: str, many: str) -> str:
    """The names as a sentence's subject with its verb: "a ties", "a and b tie", "a, b and c tie"."""
    if len(names) == 1:
        return f"{names[0]} {one}"
    return f"{', '.join(names[:-1])} and {names[-1]} {many}"


def answer(rows: Sequence[dict[str, Any]], *, reference: str, reference_trainable: int, task: str) -> str:
    """One sentence from a task's leaderboard rows (each with "label", "trainable", "verdict"): which methods beat
    the reference, whether that holds for the whole table (rows compared with the reference carry "family_wise":
    their verdict survives `holm`), and whether any does at no more than a tenth of its trainable parameters."""
    tenth = reference_trainable / 10
    better = [r for r in rows if r.get("verdict") == BETTER and r["label"] != reference]
    small = [r["label"] for r in better if 0 < r["trainable"] <= tenth]
    small_ties = [r["label"] for r in rows if r.get("verdict") == TIE and 0 < r["trainable"] <= tenth]
    winners = [f"{r['label']} ({r['trainable']:,})" for r in better]
    head = (f"On {task}, {_clause(winners, 'beats', 'beat')} "
            f"{reference} ({reference_trainable:,} trainable; 95% paired interval above 0)"
            if better else
            f"On {task}, no method beats {reference} ({reference_trainable:,} trainable) by a 95% paired interval "
            "above 0")
    family = [r for r in rows if "family_wise" in r]
    holds = [r["label"] for r in better if r.get("family_wise")]
    if family and better and len(holds) < len(better):
        correction = f"Holm's correction for the table's {len(family)} comparisons"
        head += (f", and {_clause(holds, 'still does', 'still do')} after {correction}" if holds else
                 f", but {'none does' if len(better) > 1 else 'not'} after {correction}")
    if small:
        tail = f"; {_clause(small, 'does', 'do')} it with at most 1/10 of its trainable parameters."
    elif small_ties:
        tail = (f"; none does it with at most 1/10 of its parameters, where "
                f"{_clause(small_ties, 'ties', 'tie')} with it.")
    else:
        tail = "; none does it with at most 1/10 of its trainable parameters."
    return head + tail
