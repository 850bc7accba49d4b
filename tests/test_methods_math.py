"""Closed-form checks of each method in float64 on random matrices, against NumPy as an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import svdtune
from svdtune import linalg
from svdtune.linalg import Factorizer

SHAPES = [(12, 7), (7, 12), (10, 10)]


def linear(m: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n, m).double()
    with torch.no_grad():
        layer.weight.normal_()
    return layer


def build(method: str, layer: nn.Linear, **options):
    cls = svdtune.get_method(method)
    return cls(layer, cls.Config(**options), Factorizer())


def numpy_svd(W: torch.Tensor):
    """Reference SVD with svdtune's documented sign convention: largest-|.| entry of each left vector positive."""
    U, S, Vh = np.linalg.svd(W.detach().numpy(), full_matrices=False)
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    return U * signs, S, Vh * signs[:, None]


def projector(columns: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(columns)
    return q @ q.T


@pytest.mark.parametrize("alpha", [None, 2.0, 16.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_pissa_takes_the_top_r_part_and_leaves_the_residual(shape, alpha) -> None:
    layer, r = linear(*shape), 3
    a = build("pissa", layer, r=r, alpha=alpha)
    U, S, Vh = numpy_svd(layer.weight)
    s = a.config.scale
    principal = s * (a.B0 @ a.A0).numpy()
    np.testing.assert_allclose(principal, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-12)
    residual = layer.weight.detach().numpy() - principal
    np.testing.assert_allclose(residual, (U[:, r:] * S[r:]) @ Vh[r:], atol=1e-12)
    np.testing.assert_allclose(projector(a.B.detach().numpy()), U[:, :r] @ U[:, :r].T, atol=1e-12)
    assert torch.equal(a.B, a.B0) and torch.equal(a.A, a.A0)
    assert a.delta().abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_milora_takes_the_bottom_r_part(shape) -> None:
    layer, r = linear(*shape), 2
    a = build("milora", layer, r=r, alpha=4.0)
    U, S, Vh = numpy_svd(layer.weight)
    minor = a.config.scale * (a.B0 @ a.A0).numpy()
    np.testing.assert_allclose(minor, (U[:, -r:] * S[-r:]) @ Vh[-r:], atol=1e-12)
    np.testing.assert_allclose(projector(a.B0.numpy()), U[:, -r:] @ U[:, -r:].T, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_olora_b_is_orthonormal_and_spans_the_first_columns(shape) -> None:
    layer, r = linear(*shape), 3
    a = build("olora", layer, r=r, alpha=6.0)
    B0 = a.B0.numpy()
    np.testing.assert_allclose(B0.T @ B0, np.eye(r), atol=1e-12)
    W = layer.weight.detach().numpy()
    np.testing.assert_allclose(projector(B0), projector(W[:, :r]), atol=1e-10)
    # s is not divided out: the initial factors carry s times the QR component (as PEFT's OLoRA init does)
    np.testing.assert_allclose((a.B0 @ a.A0).numpy(), projector(W[:, :r]) @ W, atol=1e-10)
    assert (torch.diagonal(a.A0) >= 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_lora_xs_trains_r_squared_and_stays_in_the_singular_subspaces(shape) -> None:
    layer, r = linear(*shape), 3
    a = build("lora_xs", layer, r=r, alpha=2.0)
    assert [p.numel() for p in a.parameters() if p.requires_grad] == [r * r]
    with torch.no_grad():
        a.R.normal_()
    U, S, Vh = numpy_svd(layer.weight)
    delta = a.delta().detach().numpy()
    assert np.abs(delta).max() > 1e-3
    Pu, Pv = U[:, :r] @ U[:, :r].T, Vh[:r].T @ Vh[:r]
    np.testing.assert_allclose(Pu @ delta, delta, atol=1e-12)
    np.testing.assert_allclose(delta @ Pv, delta, atol=1e-12)
    expected = a.config.scale * U[:, :r] @ a.R.detach().numpy() @ (S[:r, None] * Vh[:r])
    np.testing.assert_allclose(delta, expected, atol=1e-12)


def test_lora_scale_and_rslora() -> None:
    layer = linear(9, 8)
    plain = build("lora", layer, r=4, alpha=16.0)
    rs = build("lora", layer, r=4, alpha=16.0, rslora=True)
    assert plain.config.scale == 4.0 and rs.config.scale == 8.0
    assert build("lora", layer, r=4).config.scale == 1.0
    with torch.no_grad():
        rs.B.normal_()
    torch.testing.assert_close(rs.delta(), 16.0 / math.sqrt(4) * rs.B @ rs.A)


def test_residual_methods_export_rank_2r_relative_to_the_original_weight() -> None:
    layer = linear(12, 9)
    a = build("pissa", layer, r=3, alpha=5.0)
    with torch.no_grad():
        a.A.add_(torch.randn_like(a.A))
    factors = a.low_rank()
    assert factors.rank == 6 and factors.scale == a.config.scale
    torch.testing.assert_close(layer.weight + factors.dense(), a.merged_base().weight, rtol=0, atol=1e-12)


def test_randomized_svd_agrees_with_exact_on_the_top_subspace() -> None:
    torch.manual_seed(0)
    m, n, r = 200, 120, 8
    spectrum = torch.cat([torch.linspace(10, 5, r), 0.1 * torch.rand(n - r)]).double()
    Q1, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    W = (Q1 * spectrum) @ Q2.T
    exact = linalg.svd(W, dtype=torch.float64)
    approx = linalg.randomized_svd(W, r, niter=2, dtype=torch.float64)
    torch.testing.assert_close(approx.S, exact.S[:r], rtol=1e-6, atol=0)
    cosines = torch.linalg.svdvals(exact.U[:, :r].T @ approx.U)  # cosines of the principal angles
    assert cosines.min() > 1 - 1e-8
    again = linalg.randomized_svd(W, r, niter=2, dtype=torch.float64)
    assert torch.equal(again.U, approx.U), "a seeded randomized SVD must be reproducible"


def test_svd_signs_are_canonical_and_reconstruct() -> None:
    W = torch.randn(9, 6, dtype=torch.float64)
    U, S, Vh = linalg.svd(W, dtype=torch.float64)
    torch.testing.assert_close((U * S) @ Vh, W)
    rows = U.abs().argmax(dim=0)
    assert (U[rows, torch.arange(6)] > 0).all()
    U2, Vh2 = linalg.canonicalize_signs(-U, -Vh)
    assert torch.equal(U2, U) and torch.equal(Vh2, Vh)


def test_qr_has_nonnegative_diagonal() -> None:
    W = torch.randn(8, 5, dtype=torch.float64)
    Q, R = linalg.qr(W, dtype=torch.float64)
    torch.testing.assert_close(Q @ R, W)
    assert (torch.diagonal(R) >= 0).all()


def test_factor_cache_hits_the_second_time_and_is_keyed_by_the_weight(tmp_path) -> None:
    W = torch.randn(20, 10)
    first = Factorizer(tmp_path)
    a = first.svd(W)
    assert (first.hits, first.misses) == (0, 1)
    second = Factorizer(tmp_path)
    b = second.svd(W)
    assert (second.hits, second.misses) == (1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    second.svd(W + 1e-6)
    second.svd(W, dtype=torch.float64)
    assert second.misses == 2


def test_damaged_cache_entry_is_recomputed(tmp_path) -> None:
    W = torch.randn(6, 4)
    Factorizer(tmp_path).qr(W)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"garbage")
    again = Factorizer(tmp_path)
    Q, R = again.qr(W)
    assert again.misses == 1
    torch.testing.assert_close(Q @ R, W)


@pytest.mark.parametrize("shape", SHAPES)
def test_svf_with_z_one_is_w_exactly_and_any_z_scales_the_singular_values(shape) -> None:
    layer = linear(*shape)
    a = build("svf", layer)
    assert a.delta().abs().max() == 0 and [p.numel() for p in a.parameters() if p.requires_grad] == [min(shape)]
    z = torch.rand(min(shape), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():
        a.z.copy_(z)
    U, S, Vh = numpy_svd(layer.weight)
    expected = (U * (S * z.numpy())) @ Vh
    np.testing.assert_allclose((layer.weight + a.delta()).detach().numpy(), expected, atol=1e-12)


def test_svf_rescale_keeps_the_nuclear_norm_and_sigmoid_starts_near_half() -> None:
    layer = linear(12, 9)
    a = build("svf", layer, parametrization="sigmoid", rescale=True)
    z = torch.sigmoid(a.theta)
    assert 0.5 < float(z.min()) and float(z.max()) < 0.56
    merged = layer.weight + a.delta()
    nuclear = torch.linalg.svdvals(merged.detach()).sum()
    torch.testing.assert_close(nuclear, torch.linalg.svdvals(layer.weight.detach()).sum(), rtol=1e-12, atol=0)


def test_svf_saves_only_z_and_recomputes_its_bases(tmp_path) -> None:
    import json

    from helpers import make_model

    model = svdtune.adapt(make_model(), "svf", verbose=False)
    path = svdtune.save_adapter(model, tmp_path / "a")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert all(info["tensors"] == ["z"] for info in meta["modules"].values())
