"""bf16 products as float32 products of bf16 values: a bf16 unit's numerics, and no bf16 product left for PyTorch's
emulated kernel, forward or backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import svdtune
from svdtune import hardware
from svdtune.fused import low_rank_linear
from svdtune.upcast import Float32Products

BF16 = torch.bfloat16
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.addmm_.default}


class ProductDtypes(TorchDispatchMode):
    """The dtypes of the matrix products that reach ATen."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in MATMULS:
            self.dtypes.append(args[1].dtype)
        return func(*args, **(kwargs or {}))


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return x.abs().double().clamp_min(1e-30) * 2.0 ** -7


def test_a_product_is_the_float32_product_of_the_bf16_values_rounded_once() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 256).to(BF16), torch.randn(192, 256).to(BF16), torch.randn(192).to(BF16)
    with Float32Products():
        got = F.linear(x, w, b)
        batched = torch.randn(2, 6, 256).to(BF16) @ w.T
    assert got.dtype == BF16 and batched.dtype == BF16
    assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).to(BF16))
    exact = F.linear(x.double(), w.double(), b.double())
    assert ((got.double() - exact).abs() <= bf16_ulp(exact)).all(), "one rounding: within one bf16 step"


def test_float32_calls_and_other_functions_pass_through_untouched() -> None:
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with Float32Products():
        assert torch.equal(F.linear(x, w), F.linear(x.clone(), w.clone()))
        assert torch.relu(x.to(BF16)).dtype == BF16


def test_a_mixed_or_out_call_keeps_pytorchs_own_behaviour() -> None:
    x, w = torch.randn(4, 8).to(BF16), torch.randn(3, 8)
    with Float32Products(), pytest.raises(RuntimeError):
        F.linear(x, w)  # bf16 with float32: PyTorch's dtype error, not a silent upcast
    out = torch.empty(4, 3, dtype=BF16)
    with Float32Products():
        torch.mm(x, w.T.to(BF16), out=out)
    assert torch.equal(out, torch.mm(x, w.T.to(BF16))), "the result lands in the caller's tensor"


def test_the_fused_adapter_call_runs_in_float32_forward_and_backward_with_bf16_outputs() -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 256).to(BF16).requires_grad_()
    w = torch.randn(192, 256).to(BF16)
    A = (0.1 * torch.randn(4, 256)).requires_grad_()
    B = (0.1 * torch.randn(192, 4)).requires_grad_()
    products = ProductDtypes()
    with Float32Products(), products:
        y = low_rank_linear(x, w, None, A.to(BF16), B.to(BF16), 0.5)
        y.float().square().sum().backward()
    assert y.dtype == BF16 and x.grad.dtype == BF16 and A.grad.dtype == B.grad.dtype == torch.float32
    assert products.dtypes and set(products.dtypes) == {torch.float32}
    # the same values through float32 autograd
    x32, A32, B32 = x.detach().float().requires_grad_(), A.detach().clone(), B.detach().clone()
    A32.requires_grad_(), B32.requires_grad_()
    y32 = F.linear(x32, w.float()) + 0.5 * F.linear(F.linear(x32, A32.to(BF16).float()), B32.to(BF16).float())
    assert torch.equal(y, y32.to(BF16))
    y32.to(BF16).float().square().sum().backward()
    torch.testing.assert_close(A.grad, A32.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(B.grad, B32.grad, rtol=2e-2, atol=1e-3)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["lora", "svf", "svft", "alora"])
def test_a_bf16_llama_step_leaves_no_bf16_product_to_aten_and_matches_the_bf16_kernels(method: str) -> None:
    losses, grads = {}, {}
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    for upcast in (False, True):
        model = tiny_llama().to(BF16)
        svdtune.adapt(model, method, verbose=False, progress=False)
        products = ProductDtypes()
        with Float32Products() if upcast else contextlib.nullcontext(), products:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad is not None for p in trained)
        assert products.dtypes and (BF16 in products.dtypes) is not upcast, "without the mode ATen gets bf16"
        losses[upcast], grads[upcast] = float(loss), torch.cat([p.grad.flatten() for p in trained])
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    cosine = F.cosine_similarity(grads[True], grads[False], dim=0)
    assert cosine > 0.99, f"the gradients of the two bf16 paths point the same way (cosine {cosine:.4f})"


@pytest.mark.parametrize(("flags", "dtype", "upcast"), [({"avx2"}, BF16, True), ({"avx2"}, torch.float32, False),
                                                          ({"avx2", "avx512_bf16"}, BF16, False)])
def test_bf16_products_applies_only_to_a_bf16_model_on_a_cpu_without_bf16_units(monkeypatch, flags, dtype,
                                                                                 upcast) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    model = torch.nn.Linear(4, 4).to(dtype)
    assert isinstance(svdtune.bf16_products(model), Float32Products) is upcast
