"""Crash-safe training: atomic checkpoint writes and exact mid-epoch resume.

- :class:`AtomicCheckpointIO` writes each ``.ckpt`` to a temporary file in the checkpoint's own folder, fsyncs it and
  ``os.replace``-s it over the target, so a kill during a save leaves the previous checkpoint intact.
- :class:`~recipes.loader.ResumableDataLoader` (``loader.py``) draws its order from ``(seed, epoch)`` only and
  reports how many batches of the
  current epoch were consumed (Lightning stores that in the checkpoint); after ``--ckpt_path`` it skips them.
- :class:`ResumeCallback` stores the torch / numpy / python random states in the checkpoint and restores them
  right before the first training batch after a resume, so dropout and modality dropout continue as if
  training had never stopped; it also hands the saved loader position to the training loaders (Lightning skips
  that when ``configure_optimizers`` already built the loaders to count the training steps).

Together they make ``fusion-zoo fit --ckpt_path <run>/checkpoints/last.ckpt`` after a crash give the same weights
as an uninterrupted run on CPU (tests/reliability/test_resume.py).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from encoders._atomic import atomic_write

from .loader import ResumableDataLoader

__all__ = ["AtomicCheckpointIO", "ResumeCallback", "CachedFeatureThreads"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: temp file in the same folder + fsync + ``os.replace``.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy (not a rename)
    when that folder is on another file system. Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


class ResumeCallback(pl.Callback):
    """Saves the global random states with every checkpoint; on resume restores them before the first batch and
    gives each stateful training loader its saved position."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return "ResumeCallback"

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = list(fit_state.get("combined_loader", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._loader_states = self._loader_states, []
        loaders = [dl for dl in _flatten(trainer.train_dataloader) if isinstance(dl, ResumableDataLoader)]
        if states and len(states) == len(loaders):
            for loader, state in zip(loaders, states, strict=True):
                loader.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        states: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(legacy=True),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return _plain(states)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten(loaders: Any) -> list[Any]:
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flatten(v)]
    return [] if loaders is None else [loaders]


def _plain(obj: Any) -> Any:
    """Numpy arrays and tuples -> lists/tensors so the checkpoint stays loadable with ``weights_only=True``."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class CachedFeatureThreads(pl.Callback):
    """Run the head-only training on cached features with one intra-op thread.

    With frozen encoders the data module serves cached features and a step is a handful of small matrix
    products; there, OpenMP thread hand-offs cost more than they save (measured on 2 cores: 6.5 ms/step with
    one thread, 300 ms with two while another process is busy). Encoding keeps every thread. A user's own
    ``OMP_NUM_THREADS`` always wins.
    """

    def __init__(self) -> None:
        self._saved: int | None = None

    def _cached(self, trainer: pl.Trainer) -> bool:
        dm, module = getattr(trainer, "datamodule", None), trainer.lightning_module
        use = getattr(dm, "_use_cache", None)
        return bool(use is not None and use(module.model)) and "OMP_NUM_THREADS" not in os.environ

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved is None and self._cached(trainer):
            self._saved = torch.get_num_threads()

    def _enter(self, trainer: pl.Trainer) -> None:
        if self._saved is not None:
            torch.set_num_threads(1)

    def _leave(self) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave()
