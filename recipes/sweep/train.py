"""Train and evaluate one sweep cell: a head-only fused model on cached encoder features.

The encoders never run here: every cell reads the same cached ``ModalityOutput`` tensors, so a cell costs only
the head side (projections, fusion head, trunk, classifier). Training reuses :class:`recipes.task.FusionTask`
(losses, metrics, optimiser, schedule) through :class:`CachedFeatureTask`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pytorch_lightning as pl
import torch
from torch import Tensor

from encoders import ModalityOutput
from recipes.batches import FeatureBatches
from recipes.settings import OptimConfig
from recipes.task import FusionTask
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

from .robustness import robustness_report

__all__ = ["SplitFeatures", "CachedFeatureTask", "feature_loader", "train_cell", "gate_matrix", "CELL_PROTOCOL"]

GATE_KEYS = ("gates", "routing_probs", "expert_utilisation")
#: how a cell is trained and which weights it reports (part of the sweep signature)
CELL_PROTOCOL = "fixed epochs; the epoch with the lowest val/loss when a validation split exists, else the last"


@dataclass
class SplitFeatures:
    """One split's cached encoder outputs: modality -> ModalityOutput over N samples, and labels [N] / [N, C]."""

    feats: dict[str, ModalityOutput]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def embed_dims(self) -> dict[str, int]:
        return {m: f.dim for m, f in sorted(self.feats.items())}

    def batch(self, idx: Tensor) -> dict[str, Any]:
        """The training batch format of rows ``idx``: inputs, labels and row ids."""
        return {"inputs": {m: f.index(idx) for m, f in self.feats.items()}, "labels": self.labels[idx], "index": idx}


def feature_loader(split: SplitFeatures, batch_size: int, shuffle: bool, seed: int = 0) -> FeatureBatches:
    """Batches of cached features, index slices of the split's tensors: the path ``fusion-zoo fit`` trains on."""
    return FeatureBatches(split.feats, split.labels, None, batch_size, shuffle, seed)


class CachedFeatureTask(FusionTask):
    """``FusionTask`` around a head-only ``FusionModel(config, embed_dims=...)`` for cached features.

    Only construction differs: the model has no encoders. Training, evaluation (fused and each modality
    alone), losses and the AdamW + warm-up/cosine optimiser are FusionTask's own (``optim``: OptimConfig's
    defaults when None; ``encoder_lr`` is unused, there are no encoder weights).
    """

    def __init__(self, config: dict[str, Any], embed_dims: dict[str, int], optim: OptimConfig | None = None) -> None:
        pl.LightningModule.__init__(self)
        self.model = FusionModel(FusionModelConfig.from_dict(config), embed_dims=embed_dims)
        self.cfg = self.model.config
        self.optim = optim or OptimConfig()
        self.train_only_head = False
        self.save_hyperparameters({"config": config, "embed_dims": embed_dims, **self.optim.to_dict()})
        self._init_metrics()


class _EpochPrinter(pl.Callback):
    """One short line per epoch: the cell's own progress."""

    def __init__(self, prefix: str, echo: Callable[[str], None]) -> None:
        self.prefix, self.echo, self.start = prefix, echo, time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        text = f"{float(loss):.3f}" if loss is not None else "-"
        val = trainer.callback_metrics.get("val/loss")
        text += f" val_loss={float(val):.3f}" if val is not None else ""
        self.echo(f"    {self.prefix} epoch {trainer.current_epoch + 1}/{trainer.max_epochs} loss={text} "
                  f"({time.perf_counter() - self.start:.1f}s)")


class _KeepBest(pl.Callback):
    """Keeps, in memory, the head weights of the epoch with the lowest ``val/loss``: the rule `fusion-zoo fit`
    checkpoints by, so a cell reports the model a fit of the same recipe would keep."""

    def __init__(self) -> None:
        self.best, self.epoch = float("inf"), -1
        self.losses: list[float] = []
        self.state: dict[str, Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or value is None:
            return
        loss = float(value)
        self.losses.append(loss)
        if loss < self.best:
            self.best, self.epoch = loss, trainer.current_epoch
            weights = cast(CachedFeatureTask, pl_module).model.state_dict()
            self.state = {k: v.detach().clone() for k, v in weights.items()}


@torch.no_grad()
def gate_matrix(model: FusionModel, split: SplitFeatures, batch_size: int = 512) -> dict[str, Any] | None:
    """Mean gate weights / routing probabilities per class [C, K] from the head's aux diagnostics, or None."""
    model.eval()
    sums: Tensor | None = None
    counts = torch.zeros(model.config.num_outputs)
    key = None
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(len(split), start + batch_size))
        aux = model.fuse({m: f.index(idx) for m, f in split.feats.items()}).aux
        key = key or next((k for k in GATE_KEYS if k in aux and aux[k].dim() == 2
                           and aux[k].shape[0] == idx.numel()), None)
        if key is None:
            return None
        w = aux[key].float()
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)  # [b, K] rows sum to 1
        y = split.labels[idx].long()
        if y.dim() != 1:
            return None
        sums = (sums if sums is not None else torch.zeros(model.config.num_outputs, w.shape[1]))
        sums.index_add_(0, y, w)
        counts += torch.bincount(y, minlength=counts.numel()).float()
    if sums is None or key is None:
        return None
    mods = model.modalities
    columns = mods if key == "gates" and sums.shape[1] == len(mods) else [f"expert_{i}" for i in range(sums.shape[1])]
    return {"key": key, "columns": columns, "matrix": (sums / counts.clamp_min(1)[:, None]).tolist()}


@torch.no_grad()
def head_latency_ms(model: FusionModel, split: SplitFeatures, reps: int = 20) -> float:
    """Median wall time of one single-sample forward of the head side (cached features in, logits out)."""
    model.eval()
    one = {m: f.index(slice(0, 1)) for m, f in split.feats.items()}
    for _ in range(3):
        model.fuse(one)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model.fuse(one)
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def train_cell(
    config: FusionModelConfig,
    train: SplitFeatures,
    test: SplitFeatures,
    seed: int,
    max_epochs: int,
    batch_size: int,
    optim: OptimConfig,
    robustness: Mapping[str, Any],
    echo: Callable[[str], None] = print,
    prefix: str = "",
    val: SplitFeatures | None = None,
) -> dict[str, Any]:
    """Train one head-only cell with a Lightning Trainer on CPU and evaluate it.

    With ``val``, the loss on it is measured after every epoch and the cell is evaluated with the weights of the
    epoch where it was lowest (``fusion-zoo fit``'s checkpoint rule); without, with the last epoch's.

    Returns:
        ``fused`` (test metrics), ``alone`` (modality -> test accuracy of the fused model fed that modality
        alone), ``robustness`` (condition -> metric), ``params``, ``train_seconds``, ``latency_ms``,
        ``best_epoch`` (1-based; the last epoch without ``val``), ``val_losses`` (per epoch; empty without
        ``val``) and, for heads with gate/routing diagnostics, ``gates``.
    """
    pl.seed_everything(seed, workers=False, verbose=False)
    task = CachedFeatureTask(config.to_dict(), train.embed_dims, optim)
    task.use_class_weights(train.labels, announce=False)  # "balanced" counts this cell's training labels
    task.model.fit_feature_norm(train.feats)  # standardisation from this cell's training features, as fit does
    keep = _KeepBest()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if val is not None else 0, gradient_clip_val=1.0,
        callbacks=[keep, _EpochPrinter(prefix, echo)],
    )
    start = time.perf_counter()
    trainer.fit(task, train_dataloaders=feature_loader(train, batch_size, True, seed),
                val_dataloaders=feature_loader(val, 512, False) if val is not None else None)
    train_seconds = time.perf_counter() - start
    if keep.state is not None:
        task.model.load_state_dict(keep.state)
    trainer.test(task, dataloaders=feature_loader(test, 512, False), verbose=False)
    results = task.results["test"]
    model = task.model.eval()
    metric = "mae" if config.task == "regression" else "accuracy"
    return {
        "fused": {k: v for k, v in results["fused"].items() if k != "n"},
        "alone": {m: results[m][metric] for m in config.modalities if m in results and metric in results[m]},
        "robustness": robustness_report(model, test.feats, test.labels, **robustness),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": train_seconds,
        "latency_ms": head_latency_ms(model, test),
        "best_epoch": keep.epoch + 1 if keep.state is not None else max_epochs,
        "val_losses": keep.losses,
        "gates": gate_matrix(model, test),
    }
