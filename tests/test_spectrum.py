"""Spectrum statistics on matrices with known singular values, and principal angles of known updates."""

from __future__ import annotations

import math

import pytest
import torch

import svdtune
from svdtune.analysis.spectrum import adapter_report, matrix_stats, model_spectra, plot_spectra, summarize, table

from helpers import make_model


def with_singular_values(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def test_statistics_of_a_known_spectrum_are_exact() -> None:
    S = torch.tensor([4.0, 1.0, 0.5, 0.05], dtype=torch.float64)
    stats = matrix_stats(S, band=(0.1, 1.1), top_r=1)
    assert stats["min"] == 0.05 and stats["max"] == 4.0 and stats["median"] == 0.5  # torch: lower middle value
    assert stats["in_band"] == 0.5
    assert stats["energy_top_r"] == pytest.approx(16 / (16 + 1 + 0.25 + 0.0025))
    assert stats["condition"] == pytest.approx(80.0)
    p = S / S.sum()
    assert stats["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert matrix_stats(torch.ones(5))["effective_rank"] == pytest.approx(5.0)


def test_model_spectra_recover_planted_singular_values(tmp_path) -> None:
    model = make_model()
    planted = [3.0, 2.0, 1.0, 0.5] + [0.25] * 12
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(with_singular_values(32, 32, planted + [0.0] * 16))
    spectra = model_spectra(model, progress=False)
    q = next(m for m in spectra if m.name == "model.layers.0.self_attn.q_proj")
    assert q.kind == "self_attn.q_proj" and q.layer == 0
    torch.testing.assert_close(q.S[:16].double(), torch.tensor(planted, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    summary = summarize(spectra, top_r=4)
    assert set(summary["by_kind"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(summary["by_layer"]) == {"0", "1"} and summary["all"]["matrices"] == 14
    assert "| self_attn.q_proj | 2 |" in table(summary)
    plot_spectra(spectra, tmp_path / "s")
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "s.svg").exists()


def test_principal_angles_place_pissa_in_the_top_and_milora_in_the_bottom_subspace() -> None:
    for method, inside, outside in (("pissa", "mean_cos_top", "mean_cos_bottom"),
                                    ("milora", "mean_cos_bottom", "mean_cos_top")):
        model = svdtune.adapt(make_model(dtype=torch.float64), method, r=4, verbose=False)
        with torch.no_grad():  # an update inside the initial subspace: rescale B, keep its column space
            for a in svdtune.adapters(model).values():
                a.B.mul_(1.5)
        report = adapter_report(model, k=4, progress=False)
        assert report[inside] == pytest.approx(1.0, abs=1e-9), method
        assert report[outside] < 0.9, method


def test_untrained_adapters_report_no_update() -> None:
    model = svdtune.adapt(make_model(), "lora", r=4, verbose=False)
    report = adapter_report(model, progress=False)
    assert all(p["delta_rank"] == 0 for p in report["modules"].values()) and report["intruders"] == 0
