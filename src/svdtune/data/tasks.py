"""The task registry: every data set svdtune trains on, by name, with what a run needs to know about it.

A `Task` says what kind of model learns it (a sequence classifier with a fresh head, or a causal LM answering), where
its rows come from (a fixed, seeded train/held-out split, so every run of every method sees the same examples), the
model and example length it trains with unless told otherwise, how it is scored, and how the untouched model's score
is obtained. `svdtune train --task`, `svdtune bench` and the recipes read these facts here and nowhere else; a user's
own file becomes a task with `user_task`.

    task = get_task("arc-easy")        # Task(kind="choice", model="smollm2-135m", metric="accuracy", ...)
    train_rows, held_out = task.load()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .evalsets import EVAL_SETS, task_split
from .sentiment import movie_reviews, split

CLASSIFICATION = "classification"
Kind = Literal["classification", "choice", "generation"]
Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Task:
    """One data set a model is fine-tuned and scored on."""

    name: str
    kind: Kind  # "classification" (a head on a sequence classifier), "choice" or "generation" (a causal LM)
    load: Callable[[], tuple[Rows, Rows]]  # (train, held-out) rows; the split is fixed
    model: str  # the embedded model it trains by default
    max_length: int  # tokens per example by default
    metric: str  # what a score means: "accuracy" or "exact match"
    base_note: str  # how the untouched model is scored ("random head", "zero-shot", ...)
    head: str | None  # the task-head module that trains in full beside the adapter (classifiers), else None
    description: str
    split_note: str = ""  # what the leaderboard must say about where the held-out rows come from

    @property
    def head_pattern(self) -> str | None:
        """`head` as the `train_also` regex of `svdtune.adapt` (its parameters, not look-alike names)."""
        return None if self.head is None else rf"^{self.head}\."


def movie_review_split() -> tuple[Rows, Rows]:
    return split(movie_reviews(), seed=0)


MOVIE_REVIEWS = Task(name="movie-reviews", kind=CLASSIFICATION, load=movie_review_split, model="minilm-l6",
                     max_length=64, metric="accuracy", base_note="random head", head="classifier",
                     description="Rotten-Tomatoes sentence sentiment (positive/negative), a head on a sentence encoder")
BENCHMARK_NOTES = {"choice": ("accuracy", "zero-shot"), "generation": ("exact match", "zero-shot, greedy")}


def benchmark_task(name: str) -> Task:
    spec = EVAL_SETS[name]
    metric, note = BENCHMARK_NOTES[spec.kind]
    return Task(name=name, kind=spec.kind, load=lambda: task_split(name), model="smollm2-135m", max_length=256,
                metric=metric, base_note=note, head=None, description=spec.description,
                split_note="Only validation/test examples ship with this data set: train and held-out rows are a "
                "seeded 80/20 split of them, not the official test set.")


TASKS: dict[str, Task] = {MOVIE_REVIEWS.name: MOVIE_REVIEWS, **{name: benchmark_task(name) for name in EVAL_SETS}}


def get_task(name: str) -> Task:
    """The registered task `name`, or a ValueError listing the registered ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def user_task(data: str | Path, eval_data: str | Path | None = None, *, num_labels: int = 2) -> Task:
    """A classification task on a user's JSONL/CSV of {text, label} rows (`eval_data`, or a seeded 80/20 split of
    `data`), trained like movie-reviews."""
    from .userfiles import load_rows

    def load() -> tuple[Rows, Rows]:
        rows = load_rows(data, num_labels=num_labels)
        return (rows, load_rows(eval_data, num_labels=num_labels)) if eval_data else split(rows)

    return dataclasses.replace(MOVIE_REVIEWS, name=str(data), load=load, description=f"your rows in {data}")
