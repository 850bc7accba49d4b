"""Tiny randomly initialised models and training helpers shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64
ARCHS = ("llama", "bert", "gpt2")


def make_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer model of the given family, identical for identical seeds (so 'a fresh base' can be rebuilt)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    elif arch == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4), add_pooling_layer=False)
    elif arch == "bert-cls":
        model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = output(model, ids)
    if out.shape[-1] == VOCAB:
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    return out.float().pow(2).mean()


def train_steps(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on random tokens, so every adapter has a non-zero update."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        loss(model, tokens(seed=100 + step)).backward()
        opt.step()
    model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def with_rank(method: str, r: int, **options) -> dict:
    """`options` plus r=r for methods that have a rank (SVF has none)."""
    from svdtune.methods import rank_option

    return {**rank_option(method, r), **options}
