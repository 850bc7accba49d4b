"""Figures: one set-up for every plot svdtune writes (headless backend, PNG + SVG side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`matplotlib.pyplot.subplots` on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, stem: Path, dpi: int = 120) -> Path:
    """Write `stem`.png and `stem`.svg, close the figure, return the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return stem.with_suffix(".png")
