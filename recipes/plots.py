"""Sweep figures (matplotlib, Agg backend, no display needed): accuracy bars, robustness and gate heat-maps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from encoders._atomic import atomic_write  # noqa: E402

__all__ = ["accuracy_bars", "heatmap", "robustness_heatmap"]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def accuracy_bars(
    means: Mapping[tuple[str, str], float],
    errors: Mapping[tuple[str, str], float],
    heads: Sequence[str],
    stages: Sequence[str],
    path: str | Path,
    metric: str = "accuracy",
) -> Path:
    """Grouped bar chart: one group per head, one bar per stage, error bars = 95% CI half-width.

    Args:
        means: ``(head, stage) -> mean`` over seeds.
        errors: ``(head, stage) -> CI half-width`` (NaN draws no error bar).
    """
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(heads) + 2), 3.6))
    width = 0.8 / max(1, len(stages))
    x = np.arange(len(heads))
    for i, stage in enumerate(stages):
        ys = [means.get((h, stage), math.nan) for h in heads]
        es = [errors.get((h, stage), math.nan) for h in heads]
        es = [0.0 if math.isnan(e) else e for e in es]
        ax.bar(x + (i - (len(stages) - 1) / 2) * width, ys, width, yerr=es, capsize=3, label=stage)
    ax.set_xticks(x, list(heads))
    ax.set_ylabel(f"test {metric} (mean ± 95% CI)")
    err = {k: 0.0 if math.isnan(errors.get(k, math.nan)) else errors[k] for k in means}
    lows = [m - err[k] for k, m in means.items() if not math.isnan(m)]
    if lows and metric == "accuracy":  # zoom in on the bars, error bars included
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.legend(title="stage", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str = "",
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
) -> Path:
    """Annotated heat-map of ``matrix`` [rows, cols]."""
    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.75 * cols + 2.5), max(2.5, 0.4 * rows + 1.2)))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap)
    ax.set_xticks(range(cols), list(col_labels), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(rows), list(row_labels), fontsize=8)
    finite = matrix[np.isfinite(matrix)]
    mid = float(finite.mean()) if finite.size else 0.0
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                v = matrix[r, c]
                if np.isfinite(v):
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="white" if v < mid else "black")
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def robustness_heatmap(
    table: Mapping[str, Mapping[str, float]],
    path: str | Path,
    metric: str = "accuracy",
) -> Path:
    """Heat-map of mean ``metric`` per ``head@stage`` (rows) and robustness condition (columns)."""
    rows = list(table)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in table[r] if c not in cols]
    matrix = np.array([[table[r].get(c, math.nan) for c in cols] for r in rows])
    return heatmap(matrix, rows, cols, path, title=f"test {metric} per condition (mean over seeds)")
