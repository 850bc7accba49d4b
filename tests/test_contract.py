"""The Adapter contract, checked for every registered method on tiny llama, BERT and GPT-2 models.

A method is tested here the moment it is added to `svdtune.METHODS`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import svdtune
from svdtune.core import weight_matrix
from helpers import ARCHS, loss, make_model, output, relative_error, tokens, train_steps, with_rank

METHODS = list(svdtune.METHODS)
RANK = 4
# Options that make a method start exactly at ΔW = 0 where its paper default does not (LoRA-XS draws R ~ N(0, 1e-5²)).
EXACT_START = {"lora_xs": {"init_std": 0.0}}


def adapted(method: str, arch: str = "llama", *, dtype: torch.dtype = torch.float32, **options):
    model = make_model(arch, dtype=dtype)
    svdtune.adapt(model, method, verbose=False, **with_rank(method, RANK, **options))
    return model


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor random values, so ΔW is generic (not the special init point)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_output_at_init_equals_base_model(method: str, arch: str) -> None:
    ids = tokens()
    reference = output(make_model(arch), ids)
    model = adapted(method, arch, **EXACT_START.get(method, {}))
    assert svdtune.adapters(model), "nothing was adapted"
    assert relative_error(output(model, ids), reference) <= 1e-5


def test_lora_xs_paper_init_is_small_but_not_zero() -> None:
    model = adapted("lora_xs")
    deltas = [a.delta() for a in svdtune.adapters(model).values()]
    assert all(d.abs().max() > 0 for d in deltas)
    for adapter, d in zip(svdtune.adapters(model).values(), deltas):
        assert d.norm() <= 1e-3 * weight_matrix(adapter.base).norm()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count_equals_formula(method: str, arch: str) -> None:
    model = adapted(method, arch)
    found = svdtune.adapters(model)
    expected = sum(type(a).count_trainable(*a.shape, a.config) for a in found.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == model.svdtune_summary.trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base." in n or "embed" in n)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_tensors_own_exactly_their_elements(method: str) -> None:
    """No parameter or buffer is a slice keeping a whole factorisation alive (OLoRA's R[:r] of a full R once did),
    whether the factors were just computed or read from the cache (the second `adapted`)."""
    adapted(method)
    for adapter in svdtune.adapters(adapted(method)).values():
        for name, t in [*adapter.named_parameters(recurse=False), *adapter.named_buffers(recurse=False)]:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_adapter_parameters(method: str) -> None:
    model = adapted(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, steps=1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "the step changed nothing"
    assert changed <= trainable


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_trainable_tensor(method: str) -> None:
    model = adapted(method)
    perturb(model)  # at LoRA's init B = 0, so A has no gradient yet: that is the method, not a broken graph
    model.train()
    loss(model, tokens()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_fast_forward_equals_dense_delta(method: str, arch: str) -> None:
    model = adapted(method, arch, dtype=torch.float64)
    perturb(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    for name, adapter in svdtune.adapters(model).items():
        n = adapter.shape[1]
        xi = x[..., :n] if n <= 32 else torch.randn(3, 5, n, dtype=torch.float64)
        dense = adapter.base(xi) + F.linear(xi, adapter.delta())
        torch.testing.assert_close(adapter(xi), dense, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_low_rank_factors_reproduce_delta(method: str) -> None:
    model = adapted(method, dtype=torch.float64)
    perturb(model)
    for adapter in svdtune.adapters(model).values():
        factors = adapter.low_rank()
        if factors is not None:
            torch.testing.assert_close(factors.dense(), adapter.delta(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_is_idempotent(method: str, arch: str) -> None:
    model = adapted(method, arch)
    train_steps(model)
    ids = tokens()
    unmerged = output(model, ids)
    svdtune.merge(model)
    assert not svdtune.adapters(model)
    targets = ("proj", "query", "c_attn", "dense")
    assert all(type(m).__name__ in ("Linear", "Conv1D") for n, m in model.named_modules() if n.endswith(targets))
    merged = output(model, ids)
    assert relative_error(merged, unmerged) <= 1e-5
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    svdtune.merge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_unload_restores_original_weights_exactly(method: str) -> None:
    original = make_model("llama").state_dict()
    model = adapted(method)
    train_steps(model)
    svdtune.unload(model)
    assert not svdtune.adapters(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_runs_the_base_model(method: str) -> None:
    ids = tokens()
    reference = output(make_model("llama"), ids)
    model = adapted(method)
    train_steps(model)
    adapted_out = output(model, ids)
    with svdtune.disabled(model):
        assert torch.equal(output(model, ids), reference)
    assert torch.equal(output(model, ids), adapted_out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_is_bit_exact(method: str, arch: str, tmp_path) -> None:
    model = adapted(method, arch)
    train_steps(model)
    ids = tokens()
    expected = output(model, ids)
    svdtune.save_adapter(model, tmp_path / "adapter")
    fresh = svdtune.load_adapter(make_model(arch), tmp_path / "adapter")
    assert torch.equal(output(fresh, ids), expected)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad and torch.equal(p1, p2)
