"""Causal-LM tasks: answer-only batches, choice log-likelihoods, greedy exact match, and a causal-LM bench suite.

The metrics are checked on a bigram LM with hand-set weights (tests/lm_helpers.py), whose log-likelihoods are
computed here independently from its table, and whose greedy completions are known.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svdtune import hardware, upcast
from svdtune.bench import runner
from svdtune.data.causal_lm import (
    IGNORE,
    activation_dtype,
    answer_loss,
    choice_accuracy,
    choice_scores,
    encode,
    exact_match,
    final_number,
    generate,
    lm_batches,
    pack_rows,
    real_tokens,
    target_logprobs,
)
from svdtune.data.tasks import get_task
from svdtune.train import loop, recipes
from svdtune.train.loop import TrainConfig
from svdtune.train.recipes import fine_tune, hits

from helpers import VOCAB
from lm_helpers import bigram_lm, bigram_table, char_tokenizer

SCALE = 4.0
CHOICE_WALK = {":": " ", " ": "y", "y": "e", "e": "s"}
MATH_WALK = {":": " ", " ": "4", "4": "2", "2": "<eos>"}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_encode_masks_the_prompt_and_padding_and_keeps_the_target_when_truncating(tokenizer) -> None:
    batch = encode(tokenizer, ["ab", "a"], ["cd", "c"], max_length=16, eos=True)
    a, b, c, d, space = (ids(tokenizer, ch)[0] for ch in "abcd ")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[a, b, space, c, d, eos], [a, space, c, eos, pad, pad]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, space, c, d, eos], [IGNORE, space, c, eos, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]
    short = encode(tokenizer, ["abcdef"], ["xy"], max_length=4)
    assert short["input_ids"].tolist() == [ids(tokenizer, "f xy")], "the prompt's start goes first"
    assert short["labels"].tolist() == [[IGNORE] + ids(tokenizer, " xy")]


def test_training_batches_hold_the_correct_choice_or_the_worked_answer(tokenizer) -> None:
    rows = [{"question": "q1?", "choices": ["no", "yes"], "label": 1}, {"question": "q2?", "choices": ["x", "y"],
                                                                          "label": 0}]
    batch = next(lm_batches(tokenizer, rows, kind="choice", batch_size=2, seed=0, max_length=32))
    targets = {tokenizer.decode([t for t in row if t != IGNORE]) for row in batch["labels"].tolist()}
    assert targets == {" yes", " x"}
    math_row = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    batch = next(lm_batches(tokenizer, math_row, kind="generation", batch_size=1, seed=0, max_length=64))
    assert tokenizer.decode(batch["input_ids"][0]) == "question: 1+1?\nanswer: 1+1=2\n#### 2<eos>"


def expected_score(tokenizer, prompt: str, choice: str) -> float:
    """Σ log p(token | previous token) over " " + choice under the bigram table, divided by len(choice)."""
    logp = torch.log_softmax(bigram_table(CHOICE_WALK, SCALE), dim=-1)
    sequence = ids(tokenizer, prompt)[-1:] + ids(tokenizer, " " + choice)
    return sum(float(logp[a, b]) for a, b in zip(sequence, sequence[1:])) / len(choice)


def test_choice_scores_are_length_normalised_log_likelihoods(tokenizer) -> None:
    # "yesq" follows the walk for 4 of its 5 tokens, "x" misses 1 of 2: the raw sum prefers "x", the per-character
    # mean prefers "yesq". Row 2 labels "no", which the model does not prefer.
    rows = [{"question": "Is it?\nAnswer:", "choices": ["yesq", "x"], "label": 0},
            {"question": "Really?\nAnswer:", "choices": ["yes", "no"], "label": 1}]
    model = bigram_lm(CHOICE_WALK, scale=SCALE)
    scores = choice_scores(model, tokenizer, rows, batch_tokens=30)
    for row, got in zip(rows, scores):
        want = [expected_score(tokenizer, row["question"], c) for c in row["choices"]]
        assert got == pytest.approx(want, abs=1e-5)
    assert scores[0][1] * 1 > scores[0][0] * 4, "unnormalised, 'x' would win"
    assert choice_accuracy(model, tokenizer, rows) == 0.5


def test_greedy_generation_and_exact_match_on_the_final_number(tokenizer) -> None:
    model = bigram_lm(MATH_WALK, scale=SCALE)
    rows = [{"question": "What is 6*7?", "answer": "6*7=42\n#### 42"},
            {"question": "What is 40+1?", "answer": "40+1=41\n#### 41"},
            {"question": "How many?", "answer": "#### 42.00"}]
    assert generate(model, tokenizer, ["Question: hi\nAnswer:", "x:"], max_new_tokens=8) == [" 42", " 42"]
    assert exact_match(model, tokenizer, rows, max_new_tokens=8, batch_size=2) == pytest.approx(2 / 3)


def small_lm(dtype: torch.dtype) -> LlamaForCausalLM:
    """A random 2-layer llama (grouped-query attention, rotary positions), so positions and masks matter."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).to(dtype).eval()


CHOICE_ROWS = [{"question": "which is a color?", "choices": ["red", "a tall tree", "7"], "label": 0},
               {"question": "2+2=?", "choices": ["four", "5"], "label": 0},
               {"question": "the sky at night is", "choices": ["dark", "bright green", "loud", "square"], "label": 0}]


def test_packed_prompt_sharing_scores_equal_scoring_each_choice_alone(tokenizer) -> None:
    """One packed sequence per question (prompt once, every choice after it, its own positions and mask) gives the
    log-likelihood of each prompt + choice sequence scored on its own, to float64 rounding."""
    model = small_lm(torch.float64)
    alone = []
    for row in CHOICE_ROWS:
        batch = encode(tokenizer, [row["question"]] * len(row["choices"]), row["choices"], max_length=64)
        alone.append([float(v) / len(c) for v, c in zip(target_logprobs(model, batch), row["choices"])])
    for batch_tokens in (1, 60, 4096):  # one question per forward, a few, all at once
        packed = choice_scores(model, tokenizer, CHOICE_ROWS, batch_tokens=batch_tokens, max_length=64)
        for got, want in zip(packed, alone):
            assert got == pytest.approx(want, abs=1e-9, rel=0)


def test_answer_loss_with_the_head_at_labelled_positions_equals_the_models_loss(tokenizer) -> None:
    model = small_lm(torch.float64)
    batch = next(lm_batches(tokenizer, CHOICE_ROWS, kind="choice", batch_size=3, seed=0, max_length=64))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # float64 throughout
    labels = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1))
    assert float(answer_loss(model, batch)) == pytest.approx(float(want), abs=1e-12, rel=0)
    assert float(answer_loss(model, batch)) == pytest.approx(float(model(**batch).loss), rel=1e-6), "the HF loss"
    model.train()
    loss = answer_loss(model, batch)
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_pack_rows_places_every_sequence_once_within_the_longest_width() -> None:
    lengths = [5, 3, 9, 2, 2, 7, 1, 4]
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    assert len(rows) == 4, "first fit, longest first: [9], [7, 2], [5, 4], [3, 2, 1]"


PACKING_ROWS = CHOICE_ROWS + [{"question": "a much longer question about the weather in spring?",
                               "choices": ["rain", "snow"], "label": 1},
                              {"question": "no?", "choices": ["yes", "no"], "label": 1}]


@pytest.mark.parametrize("kind", ["choice", "generation"])
def test_packed_training_batches_give_the_padded_loss_and_gradients(tokenizer, kind: str) -> None:
    """Several examples to a row (own positions, block-diagonal mask) give the loss and gradients of the right-padded
    batch to float64 rounding, through `answer_loss` and the model's own loss alike, in fewer padded tokens."""
    rows = PACKING_ROWS if kind == "choice" else [{"question": r["question"], "answer": r["choices"][r["label"]]}
                                                  for r in PACKING_ROWS]
    padded, packed = (next(lm_batches(tokenizer, rows, kind=kind, batch_size=len(rows), seed=0, max_length=64,
                                      packed=p, dtype=torch.float64)) for p in (False, True))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert real_tokens(packed) == real_tokens(padded) == int(padded["attention_mask"].sum())
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()
    model = small_lm(torch.float64).train()

    def loss_and_grads(loss_fn, batch):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    for loss_fn, tolerance in ((answer_loss, 1e-9), (loop.own_loss, 1e-6)):  # HF's loss upcasts logits to float32
        want, want_grads = loss_and_grads(loss_fn, padded)
        got, got_grads = loss_and_grads(loss_fn, packed)
        assert got == pytest.approx(want, abs=tolerance, rel=0)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=tolerance, rtol=0)


def test_packed_batches_follow_the_models_precision(tokenizer) -> None:
    """The mask takes the dtype of the model's activations, whatever its other parameters (a bf16 base whose
    adapters are float32): fine-tuning builds its packed batches with `activation_dtype`."""
    model = small_lm(torch.bfloat16).train()
    model.lm_head.float()
    assert activation_dtype(model) == torch.bfloat16
    batch = next(lm_batches(tokenizer, PACKING_ROWS, kind="choice", batch_size=5, seed=0, max_length=64, packed=True,
                            dtype=activation_dtype(model)))
    assert batch["attention_mask"].dtype == torch.bfloat16
    exact = next(lm_batches(tokenizer, PACKING_ROWS, kind="choice", batch_size=5, seed=0, max_length=64, packed=True,
                            dtype=torch.float64))
    want = float(answer_loss(small_lm(torch.float64), exact))
    assert float(answer_loss(model.to(torch.bfloat16), batch)) == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", Decimal(18)),
    ("#### 1,080 and then 5", Decimal(1080)),
    ("So the answer is $1,080.00.", Decimal(1080)),
    ("it drops by -3 degrees", Decimal(-3)),
    ("no number at all", None),
])
def test_final_number(text: str, number: Decimal | None) -> None:
    assert final_number(text) == number


CHOICE_ROWS = [{"question": f"Is {w} a fruit?\nAnswer:", "choices": ["yes", "no"], "label": int(w in "rock sand")}
               for w in ("apple", "rock", "pear", "sand")]
MATH_ROWS = [{"question": f"What is {a}+{a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"} for a in (1, 2, 3, 4)]


def tiny_lm(name: str, seed: int):
    """helpers' 2-layer llama, but with an output layer large enough to express a confident prediction (at the
    default init scale the final RMSNorm caps every logit near 0.6, and no adapter could make a loss drop much)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))
    return model.eval(), char_tokenizer()


def test_answer_only_training_learns_the_choices() -> None:
    config = TrainConfig(steps=20, lr=3e-2, warmup_ratio=0.0)
    run = fine_tune("tiny", CHOICE_ROWS, get_task("arc-easy"), "lora", {"r": 4}, config, seed=0, batch_size=4, max_length=64,
                    load=tiny_lm, progress=False)
    assert run.training.losses[-1] < 0.5 * run.training.losses[0]
    assert all(hits(run.model, run.tokenizer, CHOICE_ROWS, "choice", 64))
    # LoRA r=4, r(m+n) on q,o (32x32), k,v (16x32), gate,up (48x32), down (32x48), 2 layers
    assert run.trainable == 2 * 4 * (2 * 64 + 2 * 48 + 3 * 80)


def test_causal_lm_suite_writes_per_task_results_and_resumes(tmp_path, monkeypatch) -> None:
    loads, contexts = [], []
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})  # a CPU that emulates bf16 products

    def spy(model):
        contexts.append(type(upcast.bf16_products(model)))
        return upcast.bf16_products(model)

    monkeypatch.setattr(recipes, "bf16_products", spy)  # scoring
    monkeypatch.setattr(loop, "bf16_products", spy)  # training

    def load(name: str, seed: int):
        loads.append(seed)
        return tiny_lm(name, seed)

    data = {"arc-easy": (CHOICE_ROWS * 2, CHOICE_ROWS), "gsm8k": (MATH_ROWS * 2, MATH_ROWS[:2])}
    suite = runner.Suite(name="tiny-lm", model="tiny", tasks=("arc-easy", "gsm8k"), seeds=(0, 1), steps=2,
                        batch_size=2, eval_size=4, validation_size=2, lr_points=1, max_length=48,
                        methods=("lora", "pissa"), precision="bf16")
    results = runner.run_suite(suite, tmp_path, load=load, load_data=data.__getitem__, progress=False)
    # every run trains (12) and scores its bf16 base through float32 products on such a CPU
    assert set(contexts) == {upcast.Float32Products} and len(contexts) > 12
    keys = [(r["task"], r["label"], r["stage"], r["seed"]) for r in results["runs"]]
    assert keys == [(t, m, stage, s) for t in ("arc-easy", "gsm8k") for m in ("lora", "pissa")
                    for stage, s in (("grid", 0), ("final", 0), ("final", 1))]
    assert results["tasks"]["arc-easy"]["kind"] == "choice" and results["tasks"]["gsm8k"]["kind"] == "generation"
    assert results["tasks"]["gsm8k"]["split"] == {"train": 6, "validation": 2, "eval": 2, "seed": 0}
    assert all(0 <= r["score"] <= 1 and r["trainable"] > 0 and math.isfinite(r["final_loss"])
               for r in results["runs"])
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    table = (tmp_path / "leaderboard.md").read_text()
    assert "### arc-easy" in table and "### gsm8k" in table and "exact match % [95% CI]" in table
    assert "not the official test set" in table and "| pissa | r=8 |" in table and "head-only" not in table
    assert "bf16 base" in table
    for task in ("arc-easy", "gsm8k"):
        assert (tmp_path / task / "pareto.png").stat().st_size > 1000 and (tmp_path / task / "delta.svg").exists()
    loads.clear()
    runner.run_suite(suite, tmp_path, load=load, load_data=data.__getitem__, progress=False)
    assert loads == [0], "a finished suite re-runs nothing (only the reference model is loaded)"


def test_a_suite_cannot_mix_classification_and_causal_lm_tasks(tmp_path) -> None:
    suite = runner.Suite(name="mixed", model="tiny", tasks=("movie-reviews", "arc-easy"))
    with pytest.raises(ValueError, match="mixes classification and causal-LM tasks"):
        runner.run_suite(suite, tmp_path, load=tiny_lm, load_data=lambda _: ([], []), progress=False)


def test_bigram_helper_is_what_it_claims(tokenizer) -> None:
    model = bigram_lm(CHOICE_WALK, scale=SCALE)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids(tokenizer, "y")])).logits[0, -1]
    assert logits.shape == (VOCAB,) and int(logits.argmax()) == ids(tokenizer, "e")[0]
    assert float(logits.max() - logits.median()) == pytest.approx(SCALE, abs=1e-4)


@pytest.mark.parametrize("method", ["full", "peft-lora", "peft-pissa", "peft-adalora"])
def test_reference_runs_train_a_bf16_causal_lm_in_float32(method: str) -> None:
    """The benchmark's reference rows on a causal LM held in bf16: they train (loss moves, parameters change) with
    float32 trainable tensors, and PEFT's LoRA counts what svdtune's LoRA counts on the same layers."""
    config = TrainConfig(steps=6, lr=1e-2 if method != "full" else 1e-3, warmup_ratio=0.0)
    run = fine_tune("tiny", CHOICE_ROWS * 2, get_task("arc-easy"), method, {}, config, seed=0, batch_size=2, max_length=48,
                    precision="bf16", reference_rank=4, load=tiny_lm, progress=False)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert math.isfinite(run.training.final_loss) and run.training.losses[-1] != run.training.losses[0]
    if method == "peft-lora":
        assert run.trainable == 2 * 4 * (2 * 64 + 2 * 48 + 3 * 80)
