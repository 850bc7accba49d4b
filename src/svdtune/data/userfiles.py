"""The user's own classification data: JSONL or CSV files of {text, label} rows, checked line by line.

Every problem names the file, the line, and the fix: a broken JSON line, a missing field, an empty text, a label
that is not an integer class index in [0, num_labels), or a file with no rows at all. Nothing is silently skipped,
because a skipped row changes the experiment without anyone knowing.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file is missing, empty, or has a malformed row (the message gives the line number)."""


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a .jsonl or .csv file."""
    if path.suffix not in (".jsonl", ".csv"):
        raise DataFileError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")
    text = _text(path)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({e.msg}); each line must be one JSON "
                                    'object such as {"text": "...", "label": 1}') from None
            if not isinstance(record, dict):
                raise DataFileError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
        return records
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataFileError(f"{path}, line 1: the header names {', '.join(map(repr, repeated))} more than once; "
                            "every column needs its own name")
    rows = []
    for fields in reader:
        if len(fields) > len(header):
            raise DataFileError(f"{path}, line {reader.line_num}: {len(fields)} fields but the header has "
                                f"{len(header)}; quote texts that contain commas")
        rows.append((reader.line_num, dict(zip(header, fields))))
    return rows


def _text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark dropped); an undecodable byte names its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFileError(f"{path}, line {line}: byte {raw[e.start]:#04x} is not UTF-8 text; save the file as "
                            "UTF-8") from None


def load_rows(path: str | Path, *, num_labels: int, text_field: str = "text",
              label_field: str = "label") -> list[dict[str, Any]]:
    """Rows {"text": str, "label": int} from a JSONL or CSV file, every row validated."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    rows = []
    for number, record in _records(path):
        where = f"{path}, line {number}"
        for name in (text_field, label_field):
            if name not in record or record[name] is None:
                raise DataFileError(f"{where}: missing field {name!r} (fields present: {', '.join(record) or 'none'})"
                                    f"; name the fields with text_field=/label_field=")
        text = str(record[text_field]).strip()
        if not text:
            raise DataFileError(f"{where}: the {text_field!r} field is empty")
        try:
            label = int(str(record[label_field]).strip())
        except ValueError:
            label = None
        if label is None or not 0 <= label < num_labels:
            raise DataFileError(f"{where}: label {record[label_field]!r} is outside the label set 0..{num_labels - 1}"
                                f"; labels must be class indices (set num_labels if there are more classes)")
        rows.append({"text": text, "label": label})
    if not rows:
        raise DataFileError(f"{path}: the file holds no rows")
    return rows
