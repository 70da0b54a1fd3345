"""Figures (matplotlib, Agg backend, no display needed): sweep accuracy bars, robustness and gate heat-maps, and
each fit's own pictures (confusion matrix, training curves, MoE expert utilisation) from its run folder."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusion_common.atomic import atomic_write  # noqa: E402

__all__ = ["accuracy_bars", "heatmap", "robustness_heatmap", "confusion_matrix", "training_curves",
           "moe_utilisation", "read_metrics_csv", "fit_figures"]


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


def confusion_matrix(counts: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix [true, predicted]: cells coloured by the row-normalised rate, annotated with counts."""
    counts = np.asarray(counts, dtype=float)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * n + 2.0), max(3.0, 0.45 * n + 1.5)))
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), list(labels), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), list(labels), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for r in range(n):
            for c in range(n):
                ax.text(c, r, f"{int(counts[r, c])}", ha="center", va="center", fontsize=7,
                        color="white" if rates[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(title or f"test confusion matrix (n={int(counts.sum())})", fontsize=10)
    return _save(fig, path)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning's CSVLogger ``metrics.csv`` -> ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return series


def training_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """Two panels over training steps: losses (train, validation) and the fused validation metrics."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for key in ("train/loss", "train/task_loss", "train/late_loss", "val/loss"):
        if series.get(key):
            xs, ys = zip(*series[key], strict=True)
            ax_loss.plot(xs, ys, marker="o" if key.startswith("val") else None, ms=3, lw=1, label=key)
    for key in ("val/fused/accuracy", "val/fused/macro_f1", "val/fused/auroc", "val/fused/mae"):
        if series.get(key):
            xs, ys = zip(*series[key], strict=True)
            ax_metric.plot(xs, ys, marker="o", ms=3, lw=1, label=key.removeprefix("val/fused/"))
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation (fused)")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def moe_utilisation(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path | None:
    """Per-expert share of the routed tokens per epoch (stacked; a collapsed router shows one band), and the
    routing entropy; None when the run logged no MoE telemetry."""
    experts = sorted((k for k in series if k.startswith("train/moe/utilisation_")),
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    if not experts:
        return None
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    xs = [x for x, _ in series[experts[0]]]
    stack = np.array([[v for _, v in series[k]][: len(xs)] for k in experts])  # [E, epochs]
    ax.stackplot(xs, stack, labels=[k.rsplit("_", 1)[1] for k in experts])
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens")
    ax.set_title("expert utilisation (epoch means)", fontsize=10)
    ax.legend(title="expert", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(wspace=0.45)  # room for the legend between the panels
    if series.get("train/moe/routing_entropy"):
        hx, hy = zip(*series["train/moe/routing_entropy"], strict=True)
        ax_h.plot(hx, hy, marker="o", ms=3)
        ax_h.axhline(math.log(len(experts)), color="grey", ls="--", lw=1, label="uniform: log(E)")
        ax_h.legend(fontsize=7)
    ax_h.set_xlabel("step")
    ax_h.set_title("routing entropy (nats)", fontsize=10)
    ax_h.grid(alpha=0.3)
    return _save(fig, path)


def fit_figures(run_dir: str | Path, labels: Sequence[str] = (), confusion: np.ndarray | None = None) -> list[Path]:
    """Every picture a finished fit leaves in ``run_dir``: ``confusion_matrix.png`` (multiclass test),
    ``training_curves.png`` (from ``metrics.csv``) and ``moe_utilisation.png`` (MoE heads)."""
    run_dir = Path(run_dir)
    written = []
    if confusion is not None and len(labels) == np.asarray(confusion).shape[0]:
        written.append(confusion_matrix(confusion, labels, run_dir / "confusion_matrix.png"))
    csv_path = run_dir / "metrics.csv"
    if csv_path.is_file():
        series = read_metrics_csv(csv_path)
        written.append(training_curves(series, run_dir / "training_curves.png"))
        moe = moe_utilisation(series, run_dir / "moe_utilisation.png")
        if moe is not None:
            written.append(moe)
    return written
