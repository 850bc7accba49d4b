"""The benchmark protocol: validation carving, the learning-rate grid and choice, paired intervals, verdicts and the
generated answer, each checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from svdtune.bench.protocol import (
    BETTER,
    TIE,
    WORSE,
    answer,
    carve_validation,
    choose_rate,
    holm,
    learning_rate_grid,
    outcomes,
    paired_difference,
    verdict,
)


def test_validation_is_carved_from_the_training_rows_only_and_deterministically() -> None:
    train = [{"id": i} for i in range(50)]
    fit, validation = carve_validation(train, 10, seed=0)
    assert len(fit) == 40 and len(validation) == 10
    assert {r["id"] for r in fit}.isdisjoint(r["id"] for r in validation)
    assert sorted(r["id"] for r in fit + validation) == list(range(50))
    assert carve_validation(train, 10, seed=0) == (fit, validation)
    assert carve_validation(train, 10, seed=1)[1] != validation
    with pytest.raises(ValueError, match="needs more than 50 training rows"):
        carve_validation(train, 50)


def test_learning_rate_grid_is_geometric_around_the_default() -> None:
    assert learning_rate_grid(3e-3, 3, 3.0) == [1e-3, 3e-3, 9e-3]
    assert learning_rate_grid(1e-3, 1, 3.0) == [1e-3]
    low, high = learning_rate_grid(1e-3, 2, 4.0)
    assert low == pytest.approx(5e-4) and high == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="points >= 1 and spacing > 1"):
        learning_rate_grid(1e-3, 0, 3.0)


def test_the_chosen_rate_is_the_best_on_validation_ties_nearest_the_default() -> None:
    assert choose_rate({1e-3: 0.70, 3e-3: 0.80, 9e-3: 0.75}, 3e-3) == 3e-3
    assert choose_rate({1e-3: 0.90, 3e-3: 0.80, 9e-3: 0.75}, 3e-3) == 1e-3
    assert choose_rate({1e-3: 0.80, 3e-3: 0.80, 9e-3: 0.80}, 3e-3) == 3e-3
    assert choose_rate({1e-3: 0.80, 1e-2: 0.80}, 3e-3) == 1e-3, "1e-3 is nearer 3e-3 than 1e-2 in log scale"


def test_paired_difference_pairs_seeds_and_examples() -> None:
    method = {0: "1100", 1: "1110"}
    reference = {0: "1000", 1: "1010", 2: "1111"}  # seed 2 has no partner: left out
    diff = paired_difference(method, reference, resamples=500)
    assert diff.mean == pytest.approx((1 + 1) / 8) and diff.seeds == 2 and diff.examples == 4
    assert diff.low <= diff.mean <= diff.high
    same = paired_difference(method, method, resamples=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0), "a method paired with itself differs by exactly 0"
    always = paired_difference({0: "1" * 30}, {0: "0" * 30}, resamples=200)
    assert (always.low, always.high) == (1.0, 1.0)
    assert (same.p, always.p) == (1.0, 0.0), "no spread: no evidence at Δ = 0, certainty at Δ = 1"
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: "1"}, {1: "1"})
    with pytest.raises(ValueError, match="different numbers of examples"):
        paired_difference({0: "10"}, {0: "101"})


def test_paired_interval_is_narrower_than_ignoring_the_pairing() -> None:
    """Two methods that agree on most examples: pairing removes the examples' shared difficulty."""
    reference = "1" * 60 + "0" * 40
    method = "1" * 60 + "0" * 36 + "1" * 4  # +4 points, right exactly where the reference is right, and 4 more
    paired = paired_difference({0: method}, {0: reference}, resamples=1000)
    assert paired.low > 0, "every paired difference is >= 0, so the interval cannot reach below 0"
    assert verdict(paired) == BETTER


def test_p_value_is_the_normal_approximation_with_the_paired_standard_error() -> None:
    """One seed: the bootstrap over examples estimates the paired standard error sd(d) / sqrt(N) (d = per-example
    differences), so p agrees with the textbook paired z-test worked out here."""
    reference = "1" * 50 + "0" * 50
    method = "1" * 46 + "0" * 4 + "1" * 12 + "0" * 38  # 4 lost, 12 gained: Δ = +0.08
    d = [int(a) - int(b) for a, b in zip(method, reference)]
    mean = sum(d) / 100
    error = math.sqrt(sum((x - mean) ** 2 for x in d) / 100 / 100)
    diff = paired_difference({0: method}, {0: reference}, resamples=20000)
    assert diff.mean == pytest.approx(0.08)
    assert diff.p == pytest.approx(math.erfc(mean / error / math.sqrt(2)), rel=0.15)


def test_holm_steps_down_through_the_sorted_p_values_and_stops_at_the_first_it_keeps() -> None:
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a"}, "0.01 <= 0.05/3, then 0.03 > 0.05/2 stops"
    assert holm({"a": 0.001, "b": 0.02, "c": 0.04}) == {"a", "b", "c"}, "0.001 <= .05/3, 0.02 <= .05/2, 0.04 <= .05"
    assert holm({"a": 0.06, "b": 0.001}) == {"b"} and holm({}) == set()
    assert holm({"a": 0.02}, alpha=0.01) == set()


def test_verdict_follows_the_interval() -> None:
    from svdtune.bench.protocol import PairedDifference

    assert verdict(PairedDifference(0.02, 0.001, 0.04, 3, 100, 0.04)) == BETTER
    assert verdict(PairedDifference(-0.02, -0.04, -0.001, 3, 100, 0.04)) == WORSE
    assert verdict(PairedDifference(0.02, -0.001, 0.04, 3, 100, 0.06)) == TIE


def test_the_answer_sentence_follows_the_table() -> None:
    rows = [{"label": "lora", "trainable": 1000, "verdict": None},
            {"label": "pissa", "trainable": 1000, "verdict": BETTER},
            {"label": "svf", "trainable": 90, "verdict": TIE},
            {"label": "lora_xs", "trainable": 100, "verdict": WORSE}]
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert text == ("On t, pissa (1,000) beats LoRA r=8 (1,000 trainable; 95% paired interval above 0); none does it "
                    "with at most 1/10 of its parameters, where svf ties with it.")
    rows.append({"label": "svft", "trainable": 95, "verdict": TIE})
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert text.endswith("where svf and svft tie with it.")
    rows[2]["verdict"] = BETTER
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert text.startswith("On t, pissa (1,000) and svf (90) beat LoRA r=8")
    assert text.endswith("; svf does it with at most 1/10 of its trainable parameters.")
    for row, survives in zip(rows[1:], (False, True, False, False)):
        row["family_wise"] = survives
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert ("beat LoRA r=8 (1,000 trainable; 95% paired interval above 0), and svf still does after Holm's "
            "correction for the table's 4 comparisons; svf does it") in text
    rows[2]["family_wise"] = False
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert "interval above 0), but none does after Holm's correction for the table's 4 comparisons;" in text
    rows[2]["verdict"] = TIE
    text = answer(rows, reference="LoRA r=8", reference_trainable=1000, task="t")
    assert text.startswith("On t, pissa (1,000) beats LoRA r=8 (1,000 trainable; 95% paired interval above 0), but "
                           "not after Holm's correction for the table's 4 comparisons; none does it")
    none = answer(rows[:1] + rows[3:4], reference="LoRA r=8", reference_trainable=1000, task="t")
    assert none.startswith("On t, no method beats LoRA r=8") and none.endswith("1/10 of its trainable parameters.")


def test_outcomes_are_one_character_per_example() -> None:
    assert outcomes([True, False, True]) == "101"
