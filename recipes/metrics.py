"""Evaluation metrics of a fused model: torchmetrics per split and group, a nested results dict and a text table.

Results are nested as ``metrics[split][group][metric]`` where ``group`` is ``"fused"`` (the whole model on all
its inputs) or a modality (the fused model fed that modality alone, plus ``head_*`` for the late head of that
modality in late and hybrid stages).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics import classification as tmc

from fusion_common.atomic import atomic_write

__all__ = ["SplitMetrics", "task_metrics", "format_table", "write_metrics_json", "TABLE_ROWS"]

TABLE_ROWS = ("fused", "text", "image", "audio")
COLUMN_ORDER = ("accuracy", "macro_f1", "auroc", "mae", "r2", "head_accuracy", "head_mae")


def task_metrics(task: str, num_outputs: int, prefix: str = "") -> torchmetrics.MetricCollection:
    """Metrics of one task: accuracy, macro-F1, AUROC (classification) or MAE, R² (regression)."""
    if task == "multiclass":
        metrics: dict[str, torchmetrics.Metric | torchmetrics.MetricCollection] = {
            "accuracy": tmc.MulticlassAccuracy(num_outputs, average="micro"),
            "macro_f1": tmc.MulticlassF1Score(num_outputs, average="macro"),
            "auroc": tmc.MulticlassAUROC(num_outputs, average="macro"),
        }
    elif task == "multilabel":
        metrics = {
            "accuracy": tmc.MultilabelAccuracy(num_outputs, average="micro"),
            "macro_f1": tmc.MultilabelF1Score(num_outputs, average="macro"),
            "auroc": tmc.MultilabelAUROC(num_outputs, average="macro"),
        }
    else:
        metrics = {"mae": torchmetrics.MeanAbsoluteError(), "r2": torchmetrics.R2Score()}
    return torchmetrics.MetricCollection(metrics, prefix=prefix)


def _prepare(task: str, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B, C] and labels -> (preds, target) in the form torchmetrics expects."""
    logits = logits.detach().float()
    if task == "multiclass":
        return logits.softmax(-1), target.long()  # [B, C], [B]
    if task == "multilabel":
        return logits.sigmoid(), target.long()  # [B, C], [B, C]
    return logits.flatten(), target.float().reshape(logits.shape).flatten()  # [B*C], [B*C]


class SplitMetrics(nn.Module):
    """The metrics of one split, one collection per group, plus a sample count per group.

    Args:
        task: ``multiclass`` | ``multilabel`` | ``regression``.
        num_outputs: classes or regression targets C.
        groups: group names: ``fused``, modalities (fused model fed that modality alone).
        head_groups: modalities whose late head gets a ``head_accuracy`` (or ``head_mae``) metric.
    """

    def __init__(self, task: str, num_outputs: int, groups: Iterable[str], head_groups: Iterable[str] = ()) -> None:
        super().__init__()
        self.task = task
        self.collections = nn.ModuleDict({g: task_metrics(task, num_outputs) for g in groups})
        head_name = "head_mae" if task == "regression" else "head_accuracy"
        self.heads = nn.ModuleDict({g: task_metrics(task, num_outputs, prefix="head_") for g in head_groups})
        self.head_name = head_name
        self.counts = nn.ModuleDict({g: torchmetrics.SumMetric() for g in self.collections})
        self.head_counts = nn.ModuleDict({g: torchmetrics.SumMetric() for g in self.heads})

    def update(self, group: str, logits: Tensor, target: Tensor, head: bool = False) -> None:
        """Add a batch of predictions [B, C] and labels to ``group`` (no-op for an empty batch)."""
        if logits.shape[0] == 0:
            return
        preds, tgt = _prepare(self.task, logits, target)
        _collection(self.heads if head else self.collections, group).update(preds, tgt)
        n = torch.tensor(float(logits.shape[0]), device=logits.device)
        _count(self.head_counts if head else self.counts, group).update(n)

    def compute(self) -> dict[str, dict[str, float]]:
        """Synchronised results ``{group: {metric: value}}``; groups that saw no sample are left out."""
        out: dict[str, dict[str, float]] = {}
        for group in self.counts:
            n = float(_count(self.counts, group).compute())
            if n > 0:
                values = _collection(self.collections, group).compute().items()
                out[group] = {k: float(v) for k, v in values} | {"n": int(n)}
        for group in self.head_counts:
            if float(_count(self.head_counts, group).compute()) > 0:
                head = _collection(self.heads, group).compute()[self.head_name]
                out.setdefault(group, {})[self.head_name] = float(head)
        return out

    def reset(self) -> None:
        for parts in (self.collections, self.heads):
            for group in parts:
                _collection(parts, group).reset()
        for parts in (self.counts, self.head_counts):
            for group in parts:
                _count(parts, group).reset()


def _collection(parts: nn.ModuleDict, group: str) -> torchmetrics.MetricCollection:
    """``parts[group]`` typed as the collection it holds (``ModuleDict`` items are typed ``Module``)."""
    return cast(torchmetrics.MetricCollection, parts[group])


def _count(parts: nn.ModuleDict, group: str) -> torchmetrics.SumMetric:
    """``parts[group]`` typed as the sample counter it holds."""
    return cast(torchmetrics.SumMetric, parts[group])


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "n":
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(split: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Plain-text table: rows fused/text/image/audio (those present), columns the metrics."""
    rows = [r for r in TABLE_ROWS if r in split] + sorted(set(split) - set(TABLE_ROWS))
    seen = {c for r in rows for c in split[r] if c != "n"}
    columns = [c for c in COLUMN_ORDER if c in seen] + sorted(seen - set(COLUMN_ORDER)) + ["n"]
    cells = [["", *columns]] + [[r, *(_fmt(split[r].get(c), c) for c in columns)] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(([title] if title else []) + lines)


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` (nested dicts of floats) as indented JSON; non-finite values become null."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        return obj

    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(clean(metrics), indent=2, sort_keys=True) + "\n")
    return path
