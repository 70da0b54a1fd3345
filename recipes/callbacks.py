"""Crash-safe training: atomic checkpoint writes and exact mid-epoch resume.

- :class:`AtomicCheckpointIO` writes each ``.ckpt`` to a temporary file in the checkpoint's own folder, fsyncs it and
  ``os.replace``-s it over the target, so a kill during a save leaves the previous checkpoint intact.
- :class:`~recipes.loader.ResumableDataLoader` (``loader.py``) draws its order from ``(seed, epoch)`` only and
  reports how many batches of the
  current epoch were consumed (Lightning stores that in the checkpoint); after ``--ckpt_path`` it skips them.
- :class:`ResumeCallback` stores the torch / numpy / python random states in the checkpoint and restores them
  right before the first training batch after a resume (or, for a checkpoint written at the end of an epoch, at
  the start of the next epoch, before its loader draws its worker seed), so dropout and modality dropout
  continue as if training had never stopped; it also hands the saved loader position to the training loaders
  (Lightning skips that when ``configure_optimizers`` already built the loaders to count the training steps).

Together they make ``fusion-zoo fit --ckpt_path <run>/checkpoints/last.ckpt`` after a crash give the same weights
as an uninterrupted run on CPU (tests/reliability/test_resume.py).

:class:`FusionCheckpoint` decides what is written when: ``best.ckpt`` (weights only) whenever the monitored metric
improves, ``last.ckpt`` (weights + optimizer + loops + random states, what resuming needs) every
``last_every_n_epochs`` epochs and at the end of training, or every N steps with ``every_n_train_steps``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from fusion_common.atomic import atomic_write
from fusion_errors import ConfigError

from .loader import ResumableDataLoader
from .streaming import StreamLoader

__all__ = ["AtomicCheckpointIO", "ResumeCallback", "CachedFeatureThreads", "FusionCheckpoint", "LAST_EVERY_N_EPOCHS",
           "LAST_EVERY_MINUTES"]

#: default epochs between two ``last.ckpt`` writes. The main job (default recipe, tridigits rebalanced: 40 epochs,
#: 9 improvements of val/loss, last.ckpt 6.8 MB, best.ckpt 2.3 MB) then writes 9 x 2.3 + 8 x 6.8 = 75 MB
#: (every 3 epochs: 115 MB); a kill loses at most 5 epochs (about a second each on cached tridigits features).
LAST_EVERY_N_EPOCHS = 5
#: ... and at most this many minutes of training between two writes, mid-epoch if need be, so a kill in a long
#: first epoch (fine-tuning, a large table) still resumes; a cached-feature epoch of seconds never reaches it
LAST_EVERY_MINUTES = 5.0


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
        self._epoch_end = False  # the checkpoint was written after the last batch of an epoch

    @property
    def state_key(self) -> str:
        return "ResumeCallback"

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))
        self._epoch_end = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._loader_states = self._loader_states, []
        # a StreamLoader of unknown length was handed its state by Lightning before its first (look-ahead) fetch
        loaders = [dl for dl in _flatten(trainer.train_dataloader)
                   if isinstance(dl, ResumableDataLoader) or (isinstance(dl, StreamLoader) and dl.sized)]
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

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # an epoch-end checkpoint: the uninterrupted run went on from here and its next loader drew a seed from
        # the global generator before the first batch, so the states go back before that draw
        if self._epoch_end:
            self._restore()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._restore()

    def _restore(self) -> None:
        self._epoch_end = False
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
    products; there, OpenMP thread hand-offs cost more than they save (docs/benchmarks.md). Encoding keeps every
    thread. A user's own ``OMP_NUM_THREADS`` always wins.
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


class FusionCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``best.ckpt`` when the monitored metric improves and ``last.ckpt`` on a schedule.

    - ``best.ckpt`` holds the weights only (it is for testing and exporting); the monitor is checked after every
      validation, so even a 1-epoch run has one.
    - ``last.ckpt`` carries the optimizer, loop and random states that ``--resume`` needs. It is written every
      ``last_every_n_epochs`` epochs (after that epoch's validation) and when training ends, whether or not the
      metric improved, so a run interrupted anywhere loses at most that many epochs. Stock Lightning rewrites it
      with every best (and never in between), which made it the bulk of what a run writes.
    - With ``every_n_train_steps N`` (``--checkpoint.every_n_train_steps``) Lightning's step schedule applies
      instead, and ``last.ckpt`` is written every N steps from step 0: Lightning defers every save until the
      monitored validation metric exists, so a run killed during epoch 0 had nothing to resume from.
    - Whatever the schedule, ``last.ckpt`` is also written after a training step when ``last_every_minutes`` of
      training passed since the last write (the decision is rank 0's, broadcast under DDP), so a kill anywhere,
      the first epoch included, loses at most that much time.

    Args:
        last_every_n_epochs: epochs between two ``last.ckpt`` writes (0: only at the end of training).
        last_every_minutes: most minutes of training between two ``last.ckpt`` writes (0: no time limit).
        *args, **kwargs: ``ModelCheckpoint``'s.
    """

    def __init__(self, *args: Any, last_every_n_epochs: int = LAST_EVERY_N_EPOCHS,
                 last_every_minutes: float = LAST_EVERY_MINUTES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(last_every_n_epochs, int) or isinstance(last_every_n_epochs, bool) \
                or last_every_n_epochs < 0:
            raise ConfigError(f"--checkpoint.last_every_n_epochs {last_every_n_epochs!r} must be an integer >= 0.")
        if isinstance(last_every_minutes, bool) or not isinstance(last_every_minutes, (int, float)) \
                or not 0 <= last_every_minutes < float("inf"):
            raise ConfigError(f"--checkpoint.last_every_minutes {last_every_minutes!r} must be a number >= 0 "
                              "(0: no time limit).")
        self.last_every_n_epochs = last_every_n_epochs
        self.last_every_minutes = float(last_every_minutes)
        self._last_step_written = -1  # global step of the latest last.ckpt this process wrote
        self._last_written_at = time.monotonic()  # when it was written (or training started)

    def _step_schedule(self) -> bool:
        return self._every_n_train_steps >= 1 or self._train_time_interval is not None

    def _is_last(self, filepath: str) -> bool:
        return Path(filepath).name.startswith(self.CHECKPOINT_NAME_LAST or "last")

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        is_last = self._is_last(filepath)
        trainer.save_checkpoint(filepath, self.save_weights_only or not is_last)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if is_last:
            self._last_step_written = trainer.global_step
            self._last_written_at = time.monotonic()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _epoch_end_save(self, trainer: Any) -> None:
        """The epoch schedule: the best check every ``every_n_epochs`` (1), last.ckpt every ``last_every_n_epochs``."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        epochs = trainer.current_epoch + 1
        if self._every_n_epochs >= 1 and epochs % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        n = self.last_every_n_epochs
        if self.save_last and n >= 1 and epochs % n == 0:
            self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._step_schedule() or self._defer_save_until_validation or self._should_save_on_train_epoch_end(trainer):
            super().on_validation_end(trainer, pl_module)
            return
        self._epoch_end_save(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._step_schedule() or not self._should_save_on_train_epoch_end(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        self._epoch_end_save(trainer)  # no validation: saved at the end of the training epoch instead

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The final state, for continuing with more epochs (``--resume`` with a larger ``max_epochs``)."""
        if self.save_last and not trainer.fast_dev_run and self._last_step_written != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written_at = time.monotonic()

    def _time_is_up(self, trainer: Any) -> bool:
        """Whether ``last_every_minutes`` passed since the last write; rank 0 decides for every rank."""
        if not self.save_last or self.last_every_minutes <= 0 or self._should_skip_saving_checkpoint(trainer):
            return False
        due = time.monotonic() - self._last_written_at >= 60.0 * self.last_every_minutes
        return bool(trainer.strategy.broadcast(due)) if trainer.world_size > 1 else due

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._time_is_up(trainer) and self._last_step_written != trainer.global_step:
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = saved  # the epoch schedule's saves still happen
            return
        n, step = self._every_n_train_steps, trainer.global_step
        if not self.save_last or n < 1 or step % n or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            return  # Lightning saved (or decided) itself
        saved = self._last_global_step_saved
        self._save_last_checkpoint(trainer, candidates)
        self._last_global_step_saved = saved  # the deferred save after validation still happens
