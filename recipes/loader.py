"""A DataLoader that Lightning can checkpoint mid-epoch: its order depends on ``(seed, epoch)`` only.

:class:`ResumableDataLoader` reports how many batches of the current epoch were consumed (Lightning stores that in
the checkpoint) and, after a resume, skips them, so an interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochSampler", "ResumableDataLoader"]


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by a generator seeded with ``seed + epoch`` (or in order).

    ``skip`` drops the first samples of one given epoch (set by :class:`ResumableDataLoader` on resume);
    the order therefore never depends on the global random state.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0
        self.skip: tuple[int, int] | None = None  # (epoch, samples to drop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self.skip is not None:
            if self.skip[0] == self.epoch:
                start = self.skip[1]
            self.skip = None
        yield from self.order(self.epoch)[start:]

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over :class:`EpochSampler` that Lightning can checkpoint mid-epoch.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        seed: base seed of the per-epoch shuffle.
        shuffle: shuffle each epoch (False: dataset order).
        sampler: leave None; Lightning passes its own (distributed) sampler here when it rebuilds the loader,
            and mid-epoch skipping is then off (resume from epoch-end checkpoints under DDP).
        **kwargs: any other ``DataLoader`` argument (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, seed: int = 0, shuffle: bool = True,
                 sampler: Sampler | None = None, **kwargs: Any) -> None:
        kwargs.pop("batch_sampler", None)
        if sampler is None:
            assert isinstance(dataset, Sized)
            sampler = EpochSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed, self.shuffle = seed, shuffle
        self._consumed = 0  # batches of the current epoch handed to the training loop

    # DataLoader.__iter__ is typed to return its private _BaseDataLoaderIter; callers only iterate, and this
    # generator skips the batches a resumed epoch already consumed
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        skipped = 0
        if isinstance(sampler, EpochSampler) and sampler.skip is not None and sampler.skip[0] == sampler.epoch:
            skipped = sampler.skip[1] // max(1, self.batch_size or 1)
        self._consumed = skipped
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch if isinstance(self.sampler, EpochSampler) else 0
        return {"epoch": epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochSampler) and 0 < state["batches"] < len(self):
            self.sampler.skip = (int(state["epoch"]), int(state["batches"]) * int(self.batch_size or 1))
