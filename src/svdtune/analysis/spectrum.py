"""The singular values of a model's weights, and what an adapter did to them.

Every SVD method bets on a shape of the spectrum: PiSSA that the top components carry the weight, MiLoRA that the
bottom ones are free to use, SVF that scaling each singular value is enough. This module measures it per matrix
(exact SVD in float32 through the factor cache) and summarises it per module type and per layer:

* min / median / max singular value, and the fraction inside a band (default 0.1-1.1, the Transformers² observation
  for Gemma2-9B that "99% of singular values" lie there);
* effective rank exp(H(p)), p = σ/Σσ (Roy & Vetterli 2007): how many directions the weight really uses;
* energy captured by the top r, Σ_{i<r} σ_i² / Σ σ_i²: what PiSSA at rank r takes out of W;
* condition number σ_max/σ_min.

For an adapter it reports how the spectrum moved and where ΔW points: the cosines of the principal angles between
ΔW's top-k left singular vectors and the base weight's top-k / bottom-k ones (1 = inside that subspace), and the
"intruder dimensions" (Shuttleworth et al. 2024): top singular vectors of W + ΔW that match none of W's (max |cos| <
0.5).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import Adapter, weight_matrix
from ..inject import adapters, resolve_targets, split_name
from ..linalg import Factorizer, default_cache_dir

INTRUDER_COSINE = 0.5


@dataclass
class MatrixSpectrum:
    name: str
    kind: str  # module role without the layer index, e.g. "self_attn.q_proj"
    layer: int | None
    shape: tuple[int, int]
    S: torch.Tensor  # singular values, descending


def matrix_stats(S: torch.Tensor, *, band: tuple[float, float] = (0.1, 1.1), top_r: int = 8) -> dict[str, float]:
    """Statistics of one spectrum (see the module docstring)."""
    S = S.double()
    p = S / S.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    energy = S.pow(2)
    smallest = float(S[-1])
    return {"min": smallest, "median": float(S.median()), "max": float(S[0]),
            "in_band": float(((S >= band[0]) & (S <= band[1])).double().mean()),
            "effective_rank": math.exp(entropy), "energy_top_r": float(energy[:top_r].sum() / energy.sum()),
            "condition": float(S[0]) / smallest if smallest > 0 else math.inf}


def model_spectra(model: nn.Module, *, targets: str | None = None, cache: bool = True,
                  progress: bool = True) -> list[MatrixSpectrum]:
    """Singular values of every target matrix (the frozen base weight where an adapter wraps it)."""
    found = adapters(model)
    layers = {n: a.base for n, a in found.items()} if found else resolve_targets(model, targets)[1]
    factors = Factorizer(default_cache_dir() if cache else None)
    result = []
    for name, layer in tqdm(layers.items(), desc="spectrum", unit="matrix", disable=not progress):
        W = weight_matrix(layer).detach()
        kind, index = split_name(name)
        result.append(MatrixSpectrum(name, kind, index, tuple(W.shape), factors.svd(W).S.cpu()))
    return result


def _pooled(group: list[MatrixSpectrum], band: tuple[float, float], top_r: int) -> dict[str, Any]:
    """Min/median/max and the in-band fraction over all singular values of the group; the rest averaged."""
    values = torch.cat([m.S for m in group])
    per = [matrix_stats(m.S, band=band, top_r=top_r) for m in group]
    return {"matrices": len(group), "values": values.numel(), "min": float(values.min()),
            "median": float(values.median()), "max": float(values.max()),
            "in_band": float(((values >= band[0]) & (values <= band[1])).double().mean()),
            **{k: statistics.fmean(s[k] for s in per) for k in ("effective_rank", "energy_top_r", "condition")}}


def summarize(spectra: list[MatrixSpectrum], *, band: tuple[float, float] = (0.1, 1.1),
              top_r: int = 8) -> dict[str, Any]:
    by_kind = {k: _pooled([m for m in spectra if m.kind == k], band, top_r) for k in dict.fromkeys(
        m.kind for m in spectra)}
    layers = sorted({m.layer for m in spectra if m.layer is not None})
    by_layer = {str(i): _pooled([m for m in spectra if m.layer == i], band, top_r) for i in layers}
    return {"band": list(band), "top_r": top_r, "all": _pooled(spectra, band, top_r), "by_kind": by_kind,
            "by_layer": by_layer,
            "matrices": {m.name: {"shape": list(m.shape), **matrix_stats(m.S, band=band, top_r=top_r)}
                         for m in spectra}}


def subspace_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(A) and span(B) (orthonormal columns), descending."""
    return torch.linalg.svdvals(A.T @ B).clamp(max=1.0)


def adapter_shift(adapter: Adapter, factors: Factorizer, *, k: int = 8) -> dict[str, Any]:
    """Where an adapter's ΔW points relative to the base weight's singular directions, and how the spectrum moved.

    The base's SVD comes from the factor cache (the spectrum of the same weights has just filled it)."""
    base = weight_matrix(adapter.base).detach()
    U, S, _ = (t.double() for t in factors.svd(base))
    W = base.double()
    delta = adapter.delta().detach().double()
    Ud, Sd, _ = torch.linalg.svd(delta, full_matrices=False)
    k = min(k, int((Sd > Sd[0] * 1e-6).sum()) if Sd[0] > 0 else 0, S.numel() // 2)
    if k == 0:
        return {"delta_rank": 0, "delta_norm": 0.0}
    Un, Sn, _ = torch.linalg.svd(W + delta, full_matrices=False)
    best_match = (Un[:, :k].T @ U).abs().max(dim=1).values
    return {"delta_rank": k, "delta_norm": float(delta.norm() / W.norm()),
            "cos_top": subspace_cosines(Ud[:, :k], U[:, :k]).tolist(),
            "cos_bottom": subspace_cosines(Ud[:, :k], U[:, -k:]).tolist(),
            "intruders": int((best_match < INTRUDER_COSINE).sum()),
            "top_singular_change": ((Sn[:k] - S[:k]) / S[:k]).tolist()}


def adapter_report(model: nn.Module, *, k: int = 8, progress: bool = True) -> dict[str, Any]:
    found = adapters(model)
    factors = Factorizer(default_cache_dir())
    per = {n: adapter_shift(a, factors, k=k) for n, a in tqdm(found.items(), desc="adapter", unit="matrix",
                                                               disable=not progress)}
    moved = [p for p in per.values() if p["delta_rank"]]
    mean = (lambda key: statistics.fmean(statistics.fmean(p[key]) for p in moved)) if moved else (lambda key: 0.0)
    return {"k": k, "modules": per, "mean_cos_top": mean("cos_top"), "mean_cos_bottom": mean("cos_bottom"),
            "intruders": sum(p.get("intruders", 0) for p in moved)}


def plot_spectra(spectra: list[MatrixSpectrum], stem: Path, *, band: tuple[float, float] = (0.1, 1.1)) -> None:
    """Three panels per module type: histogram of σ (log x), σ_i per layer, cumulative energy per layer."""
    from matplotlib import colormaps

    from ..plotting import save_figure, subplots

    kinds = list(dict.fromkeys(m.kind for m in spectra))
    fig, axes = subplots(len(kinds), 3, figsize=(13, 2.6 * len(kinds)), squeeze=False)
    layers = [m.layer for m in spectra if m.layer is not None]
    top = max(layers) if layers else 0
    cmap = colormaps["viridis"]
    for row, kind in zip(axes, kinds):
        group = [m for m in spectra if m.kind == kind]
        values = torch.cat([m.S for m in group]).clamp_min(1e-12)
        row[0].hist(values.log10().numpy(), bins=60, color="tab:blue")
        for edge in band:
            row[0].axvline(math.log10(edge), color="grey", linestyle=":")
        row[0].set_title(f"{kind}: log10 σ (band {band[0]}-{band[1]} dotted)", fontsize=9)
        for m in group:
            color = cmap((m.layer or 0) / max(top, 1))
            row[1].semilogy(m.S.numpy(), color=color, linewidth=0.8)
            energy = m.S.double().pow(2).cumsum(0) / m.S.double().pow(2).sum()
            row[2].plot(energy.numpy(), color=color, linewidth=0.8)
        row[1].set_title(f"{kind}: σ_i per layer (dark = early)", fontsize=9)
        row[2].set_title(f"{kind}: energy in the top i", fontsize=9)
    save_figure(fig, stem, dpi=100)


def table(summary: dict[str, Any]) -> str:
    """Markdown table of the per-module-type statistics."""
    low, high = summary["band"]
    r = summary["top_r"]
    lines = [f"| module | matrices | σ min | σ median | σ max | in [{low}, {high}] | effective rank | energy top {r} | "
             "condition |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, s in [*summary["by_kind"].items(), ("all", summary["all"])]:
        lines.append(f"| {kind} | {s['matrices']} | {s['min']:.3g} | {s['median']:.3g} | {s['max']:.3g} | "
                     f"{100 * s['in_band']:.1f}% | {s['effective_rank']:.0f} | {100 * s['energy_top_r']:.1f}% | "
                     f"{s['condition']:.3g} |")
    return "\n".join(lines) + "\n"
