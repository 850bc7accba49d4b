"""What a resumable run was started with, recorded beside its checkpoint and compared when it is resumed.

A checkpoint holds parameters and optimizer state, not the choices that produced them. Resuming with another method,
rank, learning rate, data file or seed either crashes later on a size mismatch or, worse, silently trains a mix of
two runs (the checkpoint's schedule wins over the new learning rate; LoRA factors land in a PiSSA adapter). So the
options that shape a run are recorded when it starts, and a resume that differs in any of them is refused with a
message naming each changed option and how to start over instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..paths import write_atomic

RUN_FILE = "run.json"


class ResumeMismatch(ValueError):
    """A resumed run was given options that differ from the ones its checkpoint was written with."""


def normalised(record: dict[str, Any]) -> dict[str, Any]:
    """The record as JSON would give it back (tuples become lists), so a saved and a new record compare equal."""
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'NAME: was OLD, now NEW' for every key whose value differs (a key only one side has counts as changed)."""
    saved, now = normalised(saved), normalised(now)
    return [f"{key}: was {_show(saved.get(key))}, now {_show(now.get(key))}"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


def refuse_changes(saved: dict[str, Any] | None, now: dict[str, Any], where: Path, restart: str) -> None:
    """Raise ResumeMismatch unless `now` equals the `saved` record; `restart` says how to start over instead."""
    if saved is None:
        raise ResumeMismatch(f"{where} records no run options (written by an older svdtune), so a resume cannot be "
                             f"checked against them; {restart}")
    changed = differences(saved, now)
    if changed:
        raise ResumeMismatch(f"cannot resume the run in {where} with other options ({'; '.join(changed)}): a "
                             f"resumed run continues the one it started; resume with the same options, or {restart}")


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """Record the options of a run that starts in `directory`."""
    write_atomic(directory / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(normalised(record), indent=2)))


def read_record(directory: Path) -> dict[str, Any] | None:
    """The recorded options of the run in `directory`, None if it has none; a damaged record is an error."""
    path = directory / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ResumeMismatch(f"{path} is damaged ({e}); start the run over") from None
    if not isinstance(record, dict):
        raise ResumeMismatch(f"{path} is damaged (not a JSON object); start the run over")
    return record


def _show(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value)
