"""Batches of cached features cut as index slices: the training path of every head-only fit and sweep.

When every encoder is frozen, a training step is only the head's small matmuls, and a ``DataLoader`` that
collates rows one by one (a Python list per batch, a dict per row) would cost more than the step itself.
:class:`FeatureBatches` cuts a batch with one ``index_select`` per tensor: from memory-mapped cache entries
(:class:`recipes.feature_store.StoredFeatures`, only the batch's pages are read, tokens padded per batch) or from
whole in-memory tensors. It is an iterable Lightning runs like a ``DataLoader``: it has a length, takes the epoch from
Lightning (``sampler.set_epoch``), reports how many batches of the epoch were consumed so that a checkpoint
resumes mid-epoch exactly (``state_dict`` / ``load_state_dict``), and under DDP serves each process its own
shard of every epoch's order (padded by wrap-around so every process runs the same number of steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from encoders import ModalityOutput

from .feature_store import StoredFeatures
from .loader import EpochSampler

__all__ = ["FeatureBatches"]


class FeatureBatches:
    """Batches ``{"inputs": {modality: ModalityOutput}, "labels": ..., "index": [B]}`` sliced from whole tensors.

    Args:
        feats: modality -> features of all N rows of the split (memory-mapped cache entries or in-memory tensors).
        labels: [N] class indices | [N, C] targets.
        row_ids: [N] row numbers in the source split (``index`` of each batch; default 0..N-1).
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        shuffle: a seeded shuffle per epoch (``seed + epoch``, as :class:`recipes.loader.EpochSampler`).
        seed: base seed of that shuffle.
        tokens: serve token features (False: each modality's pooled vector as its one token, no token copy).
        rank: this process's rank under DDP and ``world``, the number of processes (each gets ``1/world`` of
            every epoch's rows).
    """

    def __init__(self, feats: Mapping[str, ModalityOutput], labels: Tensor, row_ids: Tensor | None = None,
                 batch_size: int = 128, shuffle: bool = False, seed: int = 0, tokens: bool = True,
                 rank: int = 0, world: int = 1) -> None:
        n = int(labels.shape[0])
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.feats, self.labels, self.batch_size, self.tokens = dict(feats), labels, int(batch_size), tokens
        self.row_ids = torch.arange(n) if row_ids is None else torch.as_tensor(row_ids, dtype=torch.long)
        self.present = {m: f.present for m, f in self.feats.items()}  # [N] bool, computed once
        self.rank, self.world = int(rank), max(1, int(world))
        self.sampler = EpochSampler(n, seed, shuffle)  # Lightning calls sampler.set_epoch(epoch)
        self.batch_sampler = None  # Lightning reads it beside ``sampler`` (whether a loader shuffles)
        self._consumed = 0

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def _rows(self) -> int:
        """Rows this process sees per epoch (all N on one process)."""
        return math.ceil(self.num_rows / self.world)

    def __len__(self) -> int:
        return math.ceil(self._rows() / self.batch_size)

    def _order(self) -> Tensor:
        order = torch.as_tensor(self.sampler.order(self.sampler.epoch), dtype=torch.long)  # [N]
        if self.world > 1:
            total = self._rows() * self.world
            order = torch.cat([order, order[: total - order.numel()]])  # wrap-around padding, as DistributedSampler
            order = order[self.rank::self.world]
        return order

    def batch(self, idx: Tensor) -> dict[str, Any]:
        """The batch of rows ``idx`` [B]; tokens are cut to the longest valid token count among them."""
        inputs = {}
        for m, f in self.feats.items():
            if isinstance(f, StoredFeatures):  # memory-mapped: only these rows are read, padded among themselves
                inputs[m] = f.select(idx, tokens=self.tokens)
                continue
            pooled = f.pooled.index_select(0, idx)  # [B, D]
            present = self.present[m].index_select(0, idx)  # [B]
            if not self.tokens:
                inputs[m] = ModalityOutput(pooled[:, None], present[:, None], pooled)
                continue
            mask = f.mask.index_select(0, idx)  # [B, T]
            valid = mask.any(0).nonzero()
            t = int(valid.max()) + 1 if valid.numel() else 1
            inputs[m] = ModalityOutput(f.tokens.index_select(0, idx)[:, :t], mask[:, :t], pooled)
        labels, index = self.labels.index_select(0, idx), self.row_ids.index_select(0, idx)
        return {"inputs": inputs, "labels": labels, "index": index}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self._order()
        start = 0
        skip = self.sampler.skip
        if skip is not None:
            if skip[0] == self.sampler.epoch:
                start = min(skip[1], order.numel())
            self.sampler.skip = None
        self._consumed = start // self.batch_size
        for s in range(start, order.numel(), self.batch_size):
            self._consumed += 1
            yield self.batch(order[s:s + self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if 0 < int(state["batches"]) < len(self):
            self.sampler.skip = (int(state["epoch"]), int(state["batches"]) * self.batch_size)
