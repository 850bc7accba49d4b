"""User data files: good JSONL/CSV load; each kind of bad input is a clear error with its line number."""

from __future__ import annotations

import pytest

from svdtune.data.userfiles import DataFileError, load_rows


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_give_the_same_rows(tmp_path) -> None:
    jsonl = write(tmp_path, "d.jsonl", '{"text": "great film", "label": 1}\n\n{"text": "dull", "label": "0"}\n')
    csv_file = write(tmp_path, "d.csv", 'text,label\n"great film",1\ndull,0\n')
    expected = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}]
    assert load_rows(jsonl, num_labels=2) == expected == load_rows(csv_file, num_labels=2)


def test_custom_field_names(tmp_path) -> None:
    path = write(tmp_path, "d.jsonl", '{"sentence": "ok", "y": 2}\n')
    assert load_rows(path, num_labels=3, text_field="sentence", label_field="y") == [{"text": "ok", "label": 2}]


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', r"a.jsonl, line 2: not valid JSON"),
    ("b.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n',
     r"b.jsonl, line 2: missing field 'text' \(fields present: txt, label\)"),
    ("c.jsonl", '{"text": "a", "label": 5}\n', r"c.jsonl, line 1: label 5 is outside the label set 0..1"),
    ("d.jsonl", '{"text": "a", "label": "pos"}\n', r"d.jsonl, line 1: label 'pos' is outside the label set"),
    ("e.jsonl", "\n\n", r"e.jsonl: the file holds no rows"),
    ("f.csv", "text,label\nfine,1\n   ,0\n", r"f.csv, line 3: the 'text' field is empty"),
    ("g.jsonl", '[1, 2]\n', r"g.jsonl, line 1: expected a JSON object, got list"),
    ("h.txt", "text\n", r"unsupported file type '.txt'"),
])
def test_malformed_input_is_a_clear_error(tmp_path, name: str, content: str, message: str) -> None:
    with pytest.raises(DataFileError, match=message):
        load_rows(write(tmp_path, name, content), num_labels=2)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl", num_labels=2)
