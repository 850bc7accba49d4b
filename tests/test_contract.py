"""The Adapter contract, checked for every registered method on tiny llama, BERT and GPT-2 models, over (method,
options) cases: each method's defaults on every architecture, and its options (ranks, parametrisations, patterns,
inits) on llama.

A method is tested here the moment it is added to `svdtune.METHODS`: `test_every_registered_method_has_a_case`
fails until it has a case, and FULL_RANK must say whether it has `low_rank()` factors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import svdtune
from svdtune.core import weight_matrix

from helpers import ARCHS, loss, make_model, output, relative_error, tokens, train_steps, with_rank

RANK = 4
FULL_RANK = {"svf", "svft"}  # methods whose ΔW is full-rank in general: low_rank() is None; every other has factors
SVFT_PATTERNS = [{"pattern": "plain"}, {"pattern": "banded", "d": 1}, {"pattern": "random", "d": 1},
                 {"pattern": "top_k", "d": 1}]
# (method, options): options that start exactly at ΔW = 0 unless listed in NONZERO_START
CASES = [
    ("lora", {}), ("lora", {"rslora": True, "alpha": 8.0, "dropout": 0.1}),
    ("pissa", {}), ("pissa", {"niter": 2}), ("milora", {}), ("olora", {}),
    ("lora_xs", {"init_std": 0.0}), ("lora_xs", {}),
    ("svf", {}), ("svf", {"rescale": True}), ("svf", {"parametrization": "sigmoid"}),
    *[("svft", options) for options in SVFT_PATTERNS],
    *[("svft", {**options, "gate": True, "init": "kaiming"}) for options in SVFT_PATTERNS],
    ("adalora", {}), ("lora2", {}), ("lora2", {"orthonormal_init": False}),
    ("alora", {}), ("alora", {"r_max": 6}),
]


def starts_exactly(method: str, options: dict) -> bool:
    """False for the options whose paper/code init is deliberately not ΔW = 0: LoRA-XS's R ~ N(0, 1e-5²), SVF's
    sigmoid (θ drawn around 0.1) and SVFT's kaiming M."""
    return not ((method == "lora_xs" and "init_std" not in options) or options.get("parametrization") == "sigmoid"
                or options.get("init") == "kaiming")


def case_id(case: tuple[str, dict]) -> str:
    method, options = case
    return method + "".join(f"-{k}={v}" for k, v in options.items())


DEFAULTS = [case for case in CASES if not case[1] or case == ("lora_xs", {"init_std": 0.0})]
# defaults on every architecture, options on llama
ARCH_CASES = [pytest.param(case, arch, id=f"{case_id(case)}-{arch}") for case in CASES
              for arch in (ARCHS if case in DEFAULTS else ("llama",))]
ALL = [pytest.param(case, id=case_id(case)) for case in CASES]


def adapted(case: tuple[str, dict], arch: str = "llama", *, dtype: torch.dtype = torch.float32):
    method, options = case
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


def test_every_registered_method_has_a_case() -> None:
    assert {method for method, _ in CASES} == set(svdtune.METHODS)
    assert FULL_RANK <= set(svdtune.METHODS)


@pytest.mark.parametrize("case, arch", [p for p in ARCH_CASES if starts_exactly(*p.values[0])])
def test_output_at_init_equals_base_model(case, arch: str) -> None:
    ids = tokens()
    reference = output(make_model(arch), ids)
    model = adapted(case, arch)
    assert svdtune.adapters(model), "nothing was adapted"
    assert relative_error(output(model, ids), reference) <= 1e-5


def test_lora_xs_paper_init_is_small_but_not_zero() -> None:
    model = adapted(("lora_xs", {}))
    deltas = [a.delta() for a in svdtune.adapters(model).values()]
    assert all(d.abs().max() > 0 for d in deltas)
    for adapter, d in zip(svdtune.adapters(model).values(), deltas):
        assert d.norm() <= 1e-3 * weight_matrix(adapter.base).norm()


@pytest.mark.parametrize("case, arch", ARCH_CASES)
def test_trainable_parameter_count_equals_formula(case, arch: str) -> None:
    model = adapted(case, arch)
    found = svdtune.adapters(model)
    expected = sum(type(a).count_trainable(*a.shape, a.config) for a in found.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == model.svdtune_summary.trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base." in n or "embed" in n)


@pytest.mark.parametrize("case", ALL)
def test_adapter_tensors_own_exactly_their_elements(case) -> None:
    """No parameter or buffer is a slice keeping a whole factorisation alive (OLoRA's R[:r] of a full R once did),
    whether the factors were just computed or read from the cache (the second `adapted`)."""
    adapted(case)
    for adapter in svdtune.adapters(adapted(case)).values():
        for name, t in [*adapter.named_parameters(recurse=False), *adapter.named_buffers(recurse=False)]:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


@pytest.mark.parametrize("case", ALL)
def test_one_step_changes_only_adapter_parameters(case) -> None:
    model = adapted(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, steps=1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "the step changed nothing"
    assert changed <= trainable


@pytest.mark.parametrize("case", ALL)
def test_gradients_reach_every_trainable_tensor(case) -> None:
    model = adapted(case)
    perturb(model)  # at LoRA's init B = 0, so A has no gradient yet: that is the method, not a broken graph
    model.train()
    loss(model, tokens()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("case, arch", ARCH_CASES)
def test_fast_forward_equals_dense_delta(case, arch: str) -> None:
    model = adapted(case, arch, dtype=torch.float64)
    perturb(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    for name, adapter in svdtune.adapters(model).items():
        n = adapter.shape[1]
        xi = x[..., :n] if n <= 32 else torch.randn(3, 5, n, dtype=torch.float64)
        dense = adapter.base(xi) + F.linear(xi, adapter.delta())
        torch.testing.assert_close(adapter(xi), dense, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ALL)
def test_low_rank_factors_reproduce_delta(case) -> None:
    model = adapted(case, dtype=torch.float64)
    perturb(model)
    for name, adapter in svdtune.adapters(model).items():
        factors = adapter.low_rank()
        if case[0] in FULL_RANK:
            assert factors is None, f"{name}: a full-rank method returned factors; take it out of FULL_RANK"
            continue
        assert factors is not None, f"{name}: {case[0]} is low-rank, yet low_rank() is None"
        torch.testing.assert_close(factors.dense(), adapter.delta(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case, arch", ARCH_CASES)
def test_merge_equals_unmerged_and_is_idempotent(case, arch: str) -> None:
    model = adapted(case, arch)
    train_steps(model)
    ids = tokens()
    unmerged = output(model, ids)
    with torch.no_grad():
        folded = {f"{name}.weight": (weight_matrix(a.base) + a.delta()).T if type(a.base).__name__ == "Conv1D"
                  else weight_matrix(a.base) + a.delta() for name, a in svdtune.adapters(model).items()}
        original = {key: a.base.weight.clone() for key, a in zip(folded, svdtune.adapters(model).values())}
    svdtune.merge(model)
    assert not svdtune.adapters(model)
    targets = ("proj", "query", "c_attn", "dense")
    assert all(type(m).__name__ in ("Linear", "Conv1D") for n, m in model.named_modules() if n.endswith(targets))
    merged = output(model, ids)
    assert relative_error(merged, unmerged) <= 1e-5
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(weights[k], w) for k, w in folded.items())  # W + ΔW, folded once
    assert any(not torch.equal(w, original[k]) for k, w in folded.items()), "the merge changed no weight"
    svdtune.merge(model)  # once more: nothing to fold twice
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ALL)
def test_unload_restores_original_weights_exactly(case) -> None:
    original = make_model("llama").state_dict()
    model = adapted(case)
    train_steps(model)
    svdtune.unload(model)
    assert not svdtune.adapters(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("case", ALL)
def test_disabled_runs_the_base_model(case) -> None:
    ids = tokens()
    reference = output(make_model("llama"), ids)
    model = adapted(case)
    train_steps(model)
    adapted_out = output(model, ids)
    with svdtune.disabled(model):
        assert torch.equal(output(model, ids), reference)
    assert torch.equal(output(model, ids), adapted_out)


@pytest.mark.parametrize("case, arch", ARCH_CASES)
def test_save_then_load_is_bit_exact(case, arch: str, tmp_path) -> None:
    model = adapted(case, arch)
    train_steps(model)
    ids = tokens()
    expected = output(model, ids)
    svdtune.save_adapter(model, tmp_path / "adapter")
    fresh = svdtune.load_adapter(make_model(arch), tmp_path / "adapter")
    assert torch.equal(output(fresh, ids), expected)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad and torch.equal(p1, p2)
