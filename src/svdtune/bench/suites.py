"""The benchmark suites by name: which model, tasks, budget, seeds and protocol settings `svdtune bench` runs.

Kept apart from `bench` (which needs the model stack) so the command line can list the suites without importing
torch. Every suite runs the same protocol (see `protocol`); they differ in size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Suite:
    name: str
    model: str  # embedded model name or local directory
    tasks: tuple[str, ...]  # task names (`data.tasks.TASKS`); all classification, or all for a causal LM
    seeds: tuple[int, ...] = (0,)
    steps: int = 150  # optimizer steps per run
    batch_size: int = 16
    eval_size: int = 1000  # held-out examples scored per final run (at most the split's size)
    validation_size: int = 200  # training rows set aside to choose the learning rate on
    lr_points: int = 3  # learning rates per configuration, the same number for every one
    lr_spacing: float = 3.0  # factor between neighbouring rates of the grid
    reference_rank: int = 8  # the budget: LoRA at this rank on the same targets
    max_length: int = 64  # tokens per example (causal LM: prompt + answer; the prompt's start is cut first)
    precision: str = "float32"  # "bf16": the frozen base in bfloat16, adapters float32 (causal LMs; see recipes)
    methods: tuple[str, ...] = ()  # empty: every registered method
    extra_runs: tuple[tuple[str, dict[str, Any]], ...] = ()  # (method, options) at their own budget, e.g. small ranks
    references: tuple[str, ...] = ()  # reference runs (references.REFERENCES)
    allocation: tuple[tuple[str, Any], ...] = ()  # AllocationConfig options for the adaptive-rank methods


    description: str = ""  # one line for `svdtune bench --help`


SMALL_RUNS = (("lora", {"r": 1}), ("lora_xs", {"r": 8}))  # the other end of the Pareto plot
SUITES = {
    # The main job: quick, one seed, a two-point grid; the same protocol as the long suites. ALoRA's round is scored
    # to first order, as in the llm suite: the exact one tripled ALoRA's runs and took a fifth of the job. Shorter
    # runs (30 steps of 12, 200 validation rows) were tried for time and rejected: the rate choice became noise.
    "default": Suite(name="default", model="minilm-l6", tasks=("movie-reviews",), steps=40, eval_size=500,
                     validation_size=300, lr_points=2, extra_runs=SMALL_RUNS, references=("peft-lora",),
                     allocation=(("rounds", 1), ("ablation", "first_order")),
                     description="MiniLM on movie-review sentiment, every method, one seed, 2-point grid (minutes)"),
    # The default task with the whole protocol: 3 seeds, a three-point grid, every reference.
    "default-full": Suite(name="default-full", model="minilm-l6", tasks=("movie-reviews",), seeds=(0, 1, 2),
                          steps=100, eval_size=500, validation_size=300, extra_runs=SMALL_RUNS,
                          references=("full", "peft-lora", "peft-pissa", "peft-adalora"), allocation=(("rounds", 1),),
                          description="the default task with 3 seeds, a 3-point grid and every reference"),
    # SmolLM2-135M on two multiple-choice tasks of different kinds (science questions, physical commonsense) with
    # the whole protocol, sized to finish in hours on a 2-core CPU (bf16 base, short answers, packed training rows and
    # packed scoring): its 192 runs took 140 minutes of wall time on 2 cores with AMX, two at a time.
    # ALoRA scores its round to first order: the exact round is 1,891 held-out losses on SmolLM2's 210 modules
    # (15-25 minutes, 20x a LoRA run); the first-order one is 2 forwards and backwards (the agreement of the two
    # is measured in benchmarks/adaptive.py).
    "llm": Suite(name="llm", model="smollm2-135m", tasks=("arc-easy", "piqa"), seeds=(0, 1, 2), steps=40,
                 batch_size=8, eval_size=300, validation_size=100, max_length=128, precision="bf16",
                 extra_runs=SMALL_RUNS, references=("full", "peft-lora", "peft-pissa", "peft-adalora"),
                 allocation=(("rounds", 1), ("ablation", "first_order")),
                 description="SmolLM2-135M on ARC-Easy and PIQA, every method and reference, 3 seeds (2-3 hours)"),
    # The bf16 check: the llm suite's ARC-Easy runs of three methods with a float32 base, the same protocol, seeds and
    # examples, so `report.precision_comparison` pairs each bf16 run with its float32 twin.
    "llm-float32": Suite(name="llm-float32", model="smollm2-135m", tasks=("arc-easy",), seeds=(0, 1, 2), steps=40,
                         batch_size=8, eval_size=300, validation_size=100, max_length=128, precision="float32",
                         methods=("lora", "pissa", "svf"), allocation=(("rounds", 1),),
                         description="the llm suite's ARC-Easy LoRA, PiSSA and SVF runs on a float32 base (bf16 check)"),
    # Longer causal-LM suites (many hours on a CPU): three commonsense tasks, and GSM8K by exact match.
    "commonsense": Suite(name="commonsense", model="smollm2-135m", tasks=("arc-easy", "boolq", "piqa"), seeds=(0, 1, 2),
                         steps=200, batch_size=8, eval_size=500, max_length=256, precision="bf16",
                         description="SmolLM2-135M on ARC-Easy, BoolQ, PIQA, 3 seeds (a day on a CPU)"),
    "math": Suite(name="math", model="smollm2-135m", tasks=("gsm8k",), seeds=(0, 1, 2), steps=300, batch_size=4,
                  eval_size=250, max_length=384, precision="bf16",
                  description="SmolLM2-135M on GSM8K by exact match, 3 seeds (a day on a CPU)"),
}
