"""The fused low-rank kernel equals the textbook adapter path, values and every gradient, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from svdtune.fused import FEW_ROWS, fusable, low_rank_linear

from helpers import make_model, output, tokens


def textbook(x, weight, bias, A, B, scale):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B)


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_against_autograd(scale, with_bias):
    torch.manual_seed(0)
    m, n, k = 5, 4, 2
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    W = torch.randn(m, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, dtype=torch.float64, requires_grad=True) if with_bias else None
    A = torch.randn(k, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(low_rank_linear, (x, W, b, A, B, scale))
    inputs = [t for t in (x, W, b, A, B) if t is not None]
    fused = low_rank_linear(x, W, b, A, B, scale)
    plain = textbook(x, W, b, A, B, scale)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    probe = torch.randn_like(plain)
    for got, want in zip(torch.autograd.grad((fused * probe).sum(), inputs),
                         torch.autograd.grad((plain * probe).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_without_gradients_it_is_the_same_product_outside_autograd():
    """Under no_grad (inference, generation) the result is the same, bit for bit, and no autograd node is made."""
    torch.manual_seed(0)
    x, W, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    tracked = low_rank_linear(x, W, b.double(), A, B, 0.37)
    with torch.no_grad():
        untracked = low_rank_linear(x, W, b.double(), A, B, 0.37)
    assert tracked.grad_fn is not None and untracked.grad_fn is None
    assert torch.equal(tracked, untracked)


def test_frozen_inputs_get_no_gradient_work():
    """A frozen weight (the adapter case) gets no gradient; non-leaf factors (e.g. R·SVh) still backpropagate."""
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64)
    R = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    SVh = torch.randn(2, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    out = low_rank_linear(x, W, None, R @ SVh, torch.randn(6, 2, dtype=torch.float64), 2.0)
    out.sum().backward()
    assert R.grad is not None and W.grad is None


def test_adapters_use_it_only_where_it_applies():
    x = torch.randn(2, 3, dtype=torch.float32)
    layer = nn.Linear(3, 4)
    assert fusable(layer, layer.weight, x)
    assert not fusable(layer, layer.weight, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(layer, layer.weight, x)
    layer.register_forward_pre_hook(lambda module, args: None)
    assert not fusable(layer, layer.weight, x)


def test_decoding_on_a_bf16_base_runs_the_rank_path_in_the_float32_factors():
    """A few rows without gradients on a CPU (a decoding step): base product in bf16, rank-r path in float32 with the
    factors unrounded, one rounding when added; longer inputs and training keep the bf16 fused kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 320)).to(torch.bfloat16)
    svdtune.adapt(model, "lora", r=4, targets=["0"], verbose=False, progress=False)
    adapter = model[0]
    with torch.no_grad():
        adapter.B.normal_(std=0.1)
    A, B, W, b, s = adapter.A.detach(), adapter.B.detach(), adapter.base.weight, adapter.base.bias, adapter.config.scale
    assert A.dtype == torch.float32 and W.dtype == torch.bfloat16
    reference = (lambda x: F.linear(x.double(), W.double(), b.double())
                 + s * F.linear(F.linear(x.double(), A.double()), B.double()))
    few = torch.randn(1, 3, 256).to(torch.bfloat16)
    with torch.no_grad():
        decoded = adapter(few)
        expected = F.linear(few, W, b).add_(F.linear(F.linear(few.float(), A), B), alpha=s)
        assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, expected)
        many = torch.randn(FEW_ROWS + 1, 256).to(torch.bfloat16)
        assert torch.equal(adapter(many), low_rank_linear(many, W, b, A.bfloat16(), B.bfloat16(), s))
    trained = adapter(few)
    assert trained.grad_fn is not None
    for output in (decoded, trained):
        torch.testing.assert_close(output.double(), reference(few), rtol=2e-2, atol=2e-2)


def test_the_base_layer_is_a_registered_submodule_read_like_an_attribute():
    """`Adapter.base` is a property over `_modules` (a cheaper read on every call): setting it still registers the
    layer, its weight is still in the state dict, and an adapter with no base yet answers hasattr with False."""
    model = make_model("llama")
    svdtune.adapt(model, "lora", r=2, verbose=False, progress=False)
    adapter = next(iter(svdtune.adapters(model).values()))
    assert adapter.base is adapter._modules["base"] and "base.weight" in adapter.state_dict()
    replacement = nn.Linear(adapter.base.in_features, adapter.base.out_features, bias=False)
    adapter.base = replacement
    assert adapter.base is replacement and adapter._modules["base"] is replacement
    bare = type(adapter).__new__(type(adapter))
    nn.Module.__init__(bare)
    assert not hasattr(bare, "base") and getattr(bare, "base", None) is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "pissa", "lora_xs", "adalora", "lora2", "alora"])
def test_hooked_base_layers_take_the_textbook_path_with_the_same_result(kind, method):
    """Hooks on the base layers (offloading, FSDP2) must run: the adapter falls back and computes the same output."""
    model = make_model(kind, dtype=torch.float64)
    svdtune.adapt(model, method, r=2, verbose=False, progress=False, **({"k": 1} if method == "lora2" else {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = tokens()
    fused = output(model, ids)
    calls = []
    for adapter in svdtune.adapters(model).values():
        adapter.base.register_forward_hook(lambda module, args, out: calls.append(1))
    torch.testing.assert_close(output(model, ids), fused, rtol=1e-10, atol=1e-10)
    assert calls


@pytest.mark.parametrize("method", ["lora", "pissa", "lora_xs", "adalora", "alora"])
def test_dropout_applies_while_training_only(method):
    """With dropout the adapter path takes the textbook route while training; in eval it is the fused, exact one."""
    model = make_model("llama", dtype=torch.float64)
    svdtune.adapt(model, method, r=2, dropout=0.5, verbose=False, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = tokens()
    model.eval()
    first = output(model, ids)
    torch.testing.assert_close(output(model, ids), first, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    dropped = output(model, ids)
    torch.manual_seed(1)
    assert not torch.equal(output(model, ids), dropped)
