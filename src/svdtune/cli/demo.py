"""`svdtune demo`: the whole adapter life cycle on a real model and real sentences, in about a minute on 2 cores.

Adapt the embedded SmolLM2-135M-Instruct, train a few steps on Rotten-Tomatoes review sentences, save the adapter,
load it onto a freshly loaded base (bit-exact), merge it (same outputs, plain layers), and show each check's number.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import adapt, disabled, load_adapter, merge, save_adapter, unload
from ..data.models import load_model
from ..data.sentiment import movie_reviews, split

MODEL = "smollm2-135m"


def lm_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Padded causal-LM batch; padding is masked out of the loss with label -100."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_demo(*, method: str = "pissa", r: int = 8, steps: int = 6, out: Path = Path("runs/demo")) -> int:
    torch.manual_seed(0)
    print(f"== loading {MODEL} and the movie-review sentences")
    model, tokenizer = load_model(MODEL)
    train_rows, eval_rows = split(movie_reviews(), seed=0)
    train_texts = [row["text"] for row in train_rows[: 8 * steps]]
    probe = lm_batch(tokenizer, [row["text"] for row in eval_rows[:4]])
    probe_inputs = {k: v for k, v in probe.items() if k != "labels"}

    print(f"\n== svdtune.adapt(model, {method!r}, r={r}), twice: the first run fills the SVD/QR cache "
          "(unless an earlier run did), the second reads it")
    adapt(model, method, r=r)
    unload(model)
    adapt(model, method, r=r)
    print(f"at init, max |adapted - base| / max |base| logits = {_vs_base(model, probe_inputs):.2e}")

    print(f"\n== {steps} AdamW steps (batch 8) on review sentences")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        batch = lm_batch(tokenizer, train_texts[8 * step: 8 * step + 8])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.2f} s")
    model.eval()
    with torch.no_grad():
        held_out = model(**probe).loss.item()
        with disabled(model):
            held_out_base = model(**probe).loss.item()
        adapted_logits = model(**probe_inputs).logits
    print(f"held-out loss: base {held_out_base:.4f} -> adapted {held_out:.4f}")

    print("\n== save, then load onto a freshly loaded base model")
    path = save_adapter(model, out / "adapter", overwrite=True)
    fresh, _ = load_model(MODEL)
    load_adapter(fresh, path)
    with torch.no_grad():
        reloaded = fresh(**probe_inputs).logits
    print(f"saved to {path}; reloaded logits bit-identical: {torch.equal(reloaded, adapted_logits)}")

    print("\n== merge: fold ΔW into the weights, plain nn.Linear layers again")
    merge(model)
    with torch.no_grad():
        merged_logits = model(**probe_inputs).logits
    layers = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    print(f"merged vs unmerged logits: max relative difference {relative_difference(merged_logits, adapted_logits):.2e}"
          f"; projection layers are now {', '.join(sorted(layers))}")
    print(f"\nInspect the adapter with:  svdtune info {path}")
    return 0


def _vs_base(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        adapted = model(**inputs).logits
        with disabled(model):
            base = model(**inputs).logits
    return relative_difference(adapted, base)
