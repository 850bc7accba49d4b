"""SVFT in float64 on random matrices: its supports, its closed forms (against SVF and NumPy), every pattern through
the factored forward and through save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods_math import build, linear

import svdtune
from svdtune.methods.svft import SVFTConfig, support

from helpers import make_model, output, tokens, train_steps

SHAPES = [(12, 7), (7, 12), (10, 10)]
PATTERN_OPTIONS = [{"pattern": "plain"}, {"pattern": "banded", "d": 2}, {"pattern": "random", "d": 1, "seed": 5},
                   {"pattern": "top_k", "d": 3}, {"pattern": "banded", "d": 1, "rank": 5, "gate": True},
                   {"pattern": "top_k", "d": 1, "init": "kaiming", "gate": True}]


def randomize(adapter, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_with_diagonal_m_equals_svf_with_z_one_plus_m_over_s(shape) -> None:
    layer = linear(*shape)
    svft, svf = build("svft", layer), build("svf", layer)
    assert svft.delta().abs().max() == 0
    randomize(svft)
    with torch.no_grad():
        svf.z.copy_(1 + svft.m / svft.S)
    torch.testing.assert_close(svft.delta(), svf.delta(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p, d", [(1, 0), (6, 0), (6, 1), (9, 3), (9, 8)])
@pytest.mark.parametrize("pattern", ["banded", "random", "top_k"])
def test_supports_have_the_stated_size_and_no_duplicates(pattern: str, p: int, d: int) -> None:
    alignment = torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows, cols = support(pattern, p, d, alignment=alignment, seed=3)
    k = p * (2 * d + 1) - d * (d + 1)
    assert rows.numel() == cols.numel() == k
    assert len(set(zip(rows.tolist(), cols.tolist()))) == k
    assert 0 <= int(rows.min()) and int(rows.max()) < p and 0 <= int(cols.min()) and int(cols.max()) < p
    if pattern == "banded":
        assert set(zip(rows.tolist(), cols.tolist())) == {(i, j) for i in range(p) for j in range(p) if abs(i - j) <= d}
    if pattern == "top_k":
        chosen = alignment.abs()[rows, cols]
        mask = torch.ones(p, p, dtype=torch.bool)
        mask[rows, cols] = False
        assert mask.sum() == 0 or chosen.min() >= alignment.abs()[mask].max()


def test_random_support_is_seeded() -> None:
    a, b, c = (support("random", 20, 2, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0] * 20 + a[1], c[0] * 20 + c[1])


def test_top_k_ranks_the_papers_alignment_of_singular_vectors() -> None:
    layer = linear(10, 10)
    a = build("svft", layer, pattern="top_k", d=2)
    U, _, Vh = np.linalg.svd(layer.weight.detach().numpy())
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(10)])
    alignment = np.abs((U * signs).T @ (Vh * signs[:, None]).T)  # |u_iᵀ v_j|
    k = 10 * 5 - 6
    expected = set(zip(*np.unravel_index(np.argsort(-alignment, axis=None)[:k], alignment.shape)))
    assert set(zip(a.rows.tolist(), a.cols.tolist())) == {(int(i), int(j)) for i, j in expected}


@pytest.mark.parametrize("options", PATTERN_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_factored_forward_equals_dense_reconstruction(shape, options) -> None:
    layer = linear(*shape)
    a = build("svft", layer, **options)
    randomize(a)
    m, n = shape
    p = min(shape) if "rank" not in options else options["rank"]
    M = np.zeros((p, p))
    M[a.rows.numpy(), a.cols.numpy()] = a.values().detach().numpy()
    U, S, Vh = (t.detach().numpy() for t in a.triplets())
    reconstructed = layer.weight.detach().numpy() - (U * S) @ Vh + U @ (np.diag(S) + M) @ Vh  # W outside the top p
    np.testing.assert_allclose((layer.weight + a.delta()).detach().numpy(), reconstructed, atol=1e-12)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    torch.testing.assert_close(a(x), F.linear(x, torch.from_numpy(reconstructed), layer.bias), rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", PATTERN_OPTIONS)
def test_trainable_count_is_the_formula(options) -> None:
    layer = linear(12, 9)
    a = build("svft", layer, **options)
    config = SVFTConfig(**options)
    p, d = config.basis_size(12, 9), config.off_diagonals
    expected = p * (2 * d + 1) - d * (d + 1) + int(config.gate)
    assert sum(t.numel() for t in a.parameters() if t.requires_grad) == expected == a.count_trainable(12, 9, config)


def test_official_options_gate_half_and_kaiming_m() -> None:
    layer = linear(40, 30)
    a = build("svft", layer, pattern="banded", d=4, init="kaiming", gate=True)
    k = a.m.numel()
    assert float(a.gate.detach()) == 0.0 and a.delta().abs().max() > 0
    assert 0.7 < float(a.m.detach().std() / np.sqrt(2 / k)) < 1.3
    torch.testing.assert_close(a.values(), 0.5 * a.m)


@pytest.mark.parametrize("options", [{"pattern": "top_k", "d": 1, "gate": True}, {"pattern": "random", "d": 2}])
def test_save_then_load_is_bit_exact_and_stores_only_m_the_support_and_the_basis_check(options, tmp_path) -> None:
    model = svdtune.adapt(make_model(), "svft", verbose=False, **options)
    train_steps(model)
    expected = output(model, tokens())
    path = svdtune.save_adapter(model, tmp_path / "a")
    meta = json.loads((path / "adapter_config.json").read_text())
    stored = ["basis_check", "cols", "gate", "m", "rows"] if options.get("gate") else ["basis_check", "cols", "m", "rows"]
    assert all(info["tensors"] == stored for info in meta["modules"].values())
    fresh = svdtune.load_adapter(make_model(), path)
    assert torch.equal(output(fresh, tokens()), expected)


@pytest.mark.parametrize("options, message", [
    ({"pattern": "diagonal"}, "pattern must be one of"),
    ({"pattern": "plain", "d": 2}, "d=2 has no effect with pattern='plain'"),
    ({"pattern": "banded", "d": -1}, "d must be an integer >= 0"),
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"init": "normal"}, "init must be one of"),
])
def test_bad_config_names_the_field(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        SVFTConfig(**options)


def test_band_wider_than_the_matrix_names_the_module() -> None:
    with pytest.raises(ValueError, match=r"k_proj: d=16 needs d < p = 16"):
        svdtune.adapt(make_model(), "svft", pattern="banded", d=16, verbose=False)


@pytest.mark.parametrize("arch, expected", [
    ("llama", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    ("gpt2", {"mlp.c_fc", "mlp.c_proj"}),
    ("bert", {"intermediate.dense", "output.dense"}),
])
def test_mlp_only_preset_adapts_the_feed_forward_matrices_only(arch: str, expected: set[str]) -> None:
    model = svdtune.adapt(make_model(arch), "svf", targets="mlp-only", verbose=False)
    names = list(svdtune.adapters(model))
    assert len(names) == 2 * len(expected)
    assert {name.split(".", 3)[-1] if arch == "bert" else ".".join(name.split(".")[-2:]) for name in names} == expected
    assert not any("attention" in name or "attn" in name or "self_attn" in name for name in names)


@pytest.mark.parametrize("method, options", [("svf", {}), ("svft", {"pattern": "banded", "d": 1}),
                                             ("svft", {"pattern": "plain", "rank": 4})])
@pytest.mark.parametrize("shape", SHAPES)
def test_only_the_smaller_side_of_the_basis_is_kept(method, options, shape) -> None:
    a = build(method, linear(*shape), **options)
    k = options.get("rank", min(shape))
    assert {name: tuple(b.shape) for name, b in a.named_buffers() if name in ("basis", "S")} == {
        "basis": (min(shape), k), "S": (k,)}
    assert all(b.numel() <= min(shape) * k for name, b in a.named_buffers() if not name.startswith("base."))
    U, S, Vh = a.triplets()
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=U.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=U.dtype), rtol=0, atol=1e-12)


# --- how the basis is held in each precision, and checked at load ---------------------------------------------------
def conditioned(m: int, n: int, spectrum: torch.Tensor, dtype: torch.dtype) -> torch.nn.Linear:
    """An m x n layer with the given singular values (random orthogonal bases)."""
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(m, spectrum.numel(), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, spectrum.numel(), generator=gen, dtype=torch.float64))[0]
    layer = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        layer.weight.copy_((U * spectrum.double()) @ V.T)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype, spectrum, two_sided", [
    (torch.float32, torch.logspace(0, -3, 160), False),  # u·κ = 6e-5: Σ⁻¹ is safe, one side kept
    (torch.float32, torch.cat([torch.ones(150), torch.zeros(10)]), True),  # rank-deficient: no Σ⁻¹ at all
    (torch.bfloat16, torch.ones(160), True),  # a 16-bit product is never routed through Σ⁻¹
    (torch.float16, torch.linspace(1, 0.9, 160), True),
])
def test_the_basis_is_one_sided_only_where_sigma_inverse_is_safe(dtype, spectrum, two_sided) -> None:
    layer = conditioned(160, 192, spectrum, dtype)
    a = build("svft", layer, pattern="banded", d=1)
    assert a.two_sided == two_sided and a.S.dtype == torch.float32
    randomize(a)
    a.m.grad = None
    a(torch.randn(8, 192).to(dtype)).float().pow(2).sum().backward()
    assert int((a.m.grad != 0).sum()) == a.m.numel()  # every entry trains, the tail directions too


def test_a_flipped_singular_pair_is_corrected_at_load_and_a_swapped_one_refused(tmp_path, monkeypatch) -> None:
    from svdtune.linalg import SVD, Factorizer

    model = svdtune.adapt(make_model(), "svft", pattern="banded", d=1, verbose=False)
    train_steps(model)
    expected = output(model, tokens())
    path = svdtune.save_adapter(model, tmp_path / "a")
    exact = Factorizer.svd

    def flipped(self, W, **kw):
        U, S, Vh = exact(self, W, **kw)
        signs = torch.ones(S.numel(), dtype=U.dtype)
        signs[1::2] = -1
        return SVD(U * signs, S, Vh * signs[:, None])

    monkeypatch.setattr(Factorizer, "svd", flipped)
    assert torch.equal(output(svdtune.load_adapter(make_model(), path), tokens()), expected)

    def swapped(self, W, **kw):
        U, S, Vh = exact(self, W, **kw)
        order = torch.arange(S.numel())
        order[[2, 3]] = order[[3, 2]]
        return SVD(U[:, order], S[order], Vh[order])

    monkeypatch.setattr(Factorizer, "svd", swapped)
    with pytest.raises(ValueError, match="does not match the one this SVFT adapter was trained with"):
        svdtune.load_adapter(make_model(), path)
