"""Streaming splits: a table read as an iterable, for runs whose table is too large to convert or hold.

With ``--data.streaming true`` the data module reads each split through ``datasets``' streaming mode (CSV, JSON,
Parquet and hub datasets natively; other formats through ``Dataset.to_iterable_dataset``) and never builds the
whole split: no feature cache (every encoder runs each step, as in a fine-tuning run), no up-front row checks.
Memory is bounded by the shuffle buffer and one batch per loader worker, whatever the table's length.

* **Splits.** Given splits are read as they are; missing validation/test rows are carved from train by a seeded
  hash of each row's position (row ``i`` goes to the same split every run and every epoch), so a split's size is
  known exactly whenever the source's row count is.
* **Order.** Rows pass a seeded shuffle buffer (``shuffle_buffer`` rows) per epoch; the order depends on
  ``(seed, epoch)`` only.
* **Processes.** The k-th row of a split goes to shard ``k mod S`` (S = processes x loader workers): each shard
  decodes only its own rows. Under DDP the last incomplete round is dropped, so every process gets the same
  number of batches (a process with one batch more would wait forever at the next gradient exchange).
* **Bad rows.** Rows are checked as their batch is built: a label outside the label set or an unreadable cell
  raises naming the row, or (``on_bad_rows skip``) is left out of its batch.
* **Resume.** The loader reports the batches each worker handed over; a resumed epoch skips those rows before
  decoding them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from encoders import Preprocessor
from fusion_errors import DataError, InputError

from ._columns import LabelEncoder, choose_splits, infer_labels, raw_cell

__all__ = ["StreamPart", "stream_splits", "carve_codes", "carved_count", "stream_labels", "StreamBatches",
           "StreamLoader", "MAX_DISTINCT_LABELS"]

ROLE_CODES = {"train": 0, "validation": 1, "test": 2}
READ_CHUNK = 1024  # rows read from the stream at a time
#: distinct label cells a label pass collects before it asks for --data.labels
MAX_DISTINCT_LABELS = 100_000
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _unit(seed: int, positions: np.ndarray) -> np.ndarray:
    """A seeded uniform number in [0, 1) per row position (splitmix64 of ``seed`` and the position)."""
    z = positions.astype(np.uint64) + np.full(positions.shape, seed & 0xFFFFFFFF, np.uint64) * _GOLDEN + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def carve_codes(positions: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Role code per row position of a split that validation/test are carved from: 0 train, 1 validation, 2 test."""
    u = _unit(seed, positions)
    return np.where(u < val_fraction, 1, np.where(u < val_fraction + test_fraction, 2, 0)).astype(np.int8)


def carved_count(n: int, code: int, seed: int, val_fraction: float, test_fraction: float) -> int:
    """How many of the first ``n`` positions carry role ``code`` (computed in chunks: bounded memory)."""
    step = 1 << 20
    return sum(int((carve_codes(np.arange(s, min(n, s + step)), seed, val_fraction, test_fraction) == code).sum())
               for s in range(0, n, step))


@dataclass
class StreamPart:
    """One role's rows: a streamed split of the source, or the rows of it a carve assigns to the role.

    Attributes:
        role: train, validation or test.
        rows: the source split as an iterable.
        source: the source split's name (for messages).
        total: the source split's row count when known (hub metadata, Parquet footers, an in-memory split).
        code: the carve role code the role keeps, or None when the role is the whole split.
        seed, val_fraction, test_fraction: the carve's settings.
    """

    role: str
    rows: datasets.IterableDataset
    source: str
    total: int | None
    code: int | None = None
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0

    @functools.cached_property
    def length(self) -> int | None:
        """Rows of this role, when the source's count is known (a carve's count hashes every position: once)."""
        if self.total is None:
            return None
        if self.code is None:
            return self.total
        return carved_count(self.total, self.code, self.seed, self.val_fraction, self.test_fraction)

    def iter_rows(self, columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the source split, row) for the role's rows, read ``READ_CHUNK`` rows at a time."""
        rows = self.rows.select_columns(list(columns)) if columns is not None else self.rows
        at = 0
        try:
            for chunk in rows.iter(batch_size=READ_CHUNK):
                names = list(chunk)
                size = len(chunk[names[0]]) if names else 0
                keep: Sequence[int] = range(size)
                if self.code is not None:
                    codes = carve_codes(np.arange(at, at + size), self.seed, self.val_fraction, self.test_fraction)
                    keep = np.flatnonzero(codes == self.code).tolist()
                for j in keep:
                    yield at + j, {c: chunk[c][j] for c in names}
                at += size
        except DataError:
            raise
        except Exception as e:  # parser errors surface while streaming, not when the split is opened
            raise DataError(f"cannot read split {self.source!r} near row {at} ({type(e).__name__}: {e}); check the "
                            "data file, or read it without --data.streaming to see the parser's full report.") from e


def stream_splits(dd: Mapping[str, datasets.IterableDataset], totals: Mapping[str, int | None],
                  splits: dict[str, str] | None, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, StreamPart]:
    """train/validation/test parts of streamed splits: named by ``splits``, found by usual names, or carved from
    train by row-position hash (the streaming counterpart of ``_columns.pick_splits``)."""
    chosen = choose_splits(list(dd), splits)
    parts = {role: StreamPart(role, dd[name], name, totals.get(name)) for role, name in chosen.items()}
    carve = [r for r in ("validation", "test") if r not in parts]
    if carve:
        train = parts["train"]
        fractions = {"validation": val_fraction if "validation" in carve else 0.0,
                     "test": test_fraction if "test" in carve else 0.0}
        if not any(fractions.values()):
            raise DataError(f"no {' or '.join(carve)} split in the streamed data and val_fraction/test_fraction "
                            "are 0; give the splits with --data.data_files or set a fraction.")
        for role in ["train", *carve]:
            parts[role] = StreamPart(role, train.rows, train.source, train.total, ROLE_CODES[role], seed,
                                     fractions["validation"], fractions["test"])
    return parts


def stream_labels(part: StreamPart, column: str) -> list[str]:
    """Label names of a streamed training split: a ClassLabel's names, else one pass over the label column
    (distinct values only, at most ``MAX_DISTINCT_LABELS``; ``--data.labels`` skips the pass)."""
    features = part.rows.features  # None for CSV/JSON streams: their cells are typed as they are read
    if features is not None and column in features:
        inner = getattr(features[column], "feature", None)
        for f in (features[column], inner):
            if isinstance(f, datasets.ClassLabel):
                return list(f.names)
    seen: dict[Any, Any] = {}
    total = part.length
    with tqdm(total=total, desc=f"reading the labels of {part.source!r}", unit="row", leave=False,
              dynamic_ncols=True, disable=total is not None and total < 20_000) as bar:
        for _, row in part.iter_rows([column]):
            v = row[column]
            key = tuple(v) if isinstance(v, list) else v
            if key not in seen:
                seen[key] = v
                if len(seen) > MAX_DISTINCT_LABELS:
                    raise DataError(f"label column {column!r} holds more than {MAX_DISTINCT_LABELS:,} distinct values "
                                    "while streaming; a classifier needs a label set: give it with --data.labels.")
            bar.update(1)
    if not seen:
        raise DataError(f"split {part.source!r} has no rows to read labels from; add rows or give --data.labels.")
    feature = features[column] if features is not None and column in features else None
    typed = datasets.Features({column: feature}) if feature is not None else None
    return infer_labels({"train": datasets.Dataset.from_dict({column: list(seen.values())}, features=typed)}, column)


class StreamBatches(IterableDataset):
    """Batches of one streamed part, built in the process that reads them (a loader worker, or the main one).

    Args:
        part: the role's rows.
        preprocessors: modality -> the encoder's preprocessor.
        columns: modality -> the column holding its raw items.
        label_column: the label column; ``encoder`` turns its cells into label tensors.
        base: folder relative paths are resolved against.
        batch_size: rows per batch.
        shuffle: pass rows through a seeded shuffle buffer of ``buffer`` rows.
        seed: base seed of the shuffle (with the epoch and the shard).
        rank, world: this process and the number of processes (DDP).
        on_bad_rows: ``raise`` on a bad row, or ``skip`` it (left out of its batch).
    """

    def __init__(self, part: StreamPart, preprocessors: Mapping[str, Preprocessor], columns: Mapping[str, str],
                 label_column: str, encoder: LabelEncoder, base: Path | None, batch_size: int, shuffle: bool,
                 buffer: int, seed: int, rank: int = 0, world: int = 1, on_bad_rows: str = "raise") -> None:
        self.part, self.preprocessors, self.columns = part, dict(preprocessors), dict(columns)
        self.label_column, self.encoder, self.base = label_column, encoder, base
        self.batch_size, self.shuffle, self.buffer, self.seed = batch_size, shuffle, max(1, buffer), seed
        self.rank, self.world, self.on_bad_rows = rank, world, on_bad_rows
        self.epoch = 0
        self.skip: dict[int, int] = {}  # worker -> batches of this epoch to pass over (a resumed epoch)

    def _shard(self) -> tuple[int, int, int]:
        """(this worker, shard index, shard count)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker, self.rank * workers + worker, self.world * workers

    def _own_rows(self, shard: int, shards: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """This shard's rows, in stream order; under DDP only rows of complete rounds (equal counts per process)."""
        if shards == 1:
            yield from self.part.iter_rows()
            return
        pending: list[tuple[int, int, dict[str, Any]]] = []  # (row's round, position, row)
        seen = 0
        for k, (pos, row) in enumerate(self.part.iter_rows()):
            seen = k + 1
            if k % shards == shard:
                if self.world == 1:
                    yield pos, row
                else:
                    pending.append((k // shards, pos, row))
            while pending and pending[0][0] < seen // shards:  # its round is complete
                _, at, done = pending.pop(0)
                yield at, done

    def _shuffled(self, rows: Iterator[tuple[int, dict[str, Any]]], shard: int) -> Iterator[tuple[int, dict[str, Any]]]:
        if not self.shuffle:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        buf: list[tuple[int, dict[str, Any]]] = []
        for item in rows:
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        for j in rng.permutation(len(buf)).tolist():
            yield buf[j]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, shard, shards = self._shard()
        skip = self.skip.get(worker, 0)
        batch: list[tuple[int, dict[str, Any]]] = []
        number = 0
        for item in self._shuffled(self._own_rows(shard, shards), shard):
            batch.append(item)
            if len(batch) == self.batch_size:
                if number >= skip:
                    yield self._collate(batch, worker, number)
                number, batch = number + 1, []
        if batch and number >= skip:
            yield self._collate(batch, worker, number)

    def _collate(self, rows: list[tuple[int, dict[str, Any]]], worker: int, number: int) -> dict[str, Any]:
        labels, problems = self.encoder.encode([r[self.label_column] for _, r in rows])
        bad = {i: f"column {self.label_column!r}: {p}" for i, p in problems.items()}
        items = {m: [raw_cell(m, r[c], self.base) for _, r in rows] for m, c in self.columns.items()}
        inputs: dict[str, Any] = {}
        cells_bad = False
        for m in sorted(self.preprocessors):
            keep = [i for i in range(len(rows)) if i not in bad]
            try:
                inputs[m] = self.preprocessors[m]([items[m][i] for i in keep])
                continue
            except InputError:
                cells_bad = True
            for i in keep:  # find the rows the preprocessor rejects
                try:
                    self.preprocessors[m]([items[m][i]])
                except InputError as e:
                    bad[i] = f"column {self.columns[m]!r}: {e}"
        if bad and self.on_bad_rows == "raise":
            i = min(bad)
            raise DataError(f"split {self.part.source!r}, row {rows[i][0]}: {bad[i]} Fix or remove that row, or pass "
                            "--data.on_bad_rows skip to leave bad rows out.")
        keep = [i for i in range(len(rows)) if i not in bad]
        if not keep:
            raise DataError(f"every row of a batch of split {self.part.source!r} is bad (rows "
                            f"{[p for p, _ in rows][:5]}...); fix the data.")
        if cells_bad:  # skip: build the inputs again without the rows a preprocessor rejected
            inputs = {m: self.preprocessors[m]([items[m][i] for i in keep]) for m in sorted(self.preprocessors)}
        index = torch.tensor([rows[i][0] for i in keep], dtype=torch.long)  # [B] source row positions
        return {"inputs": inputs, "labels": labels[torch.as_tensor(keep)], "index": index,
                "stream": (worker, number, len(bad))}


class _EpochHolder:
    """What Lightning calls ``set_epoch`` on (``loader.sampler``)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class StreamLoader:
    """Batches of a :class:`StreamBatches` through a ``DataLoader`` (``num_workers`` processes build them).

    Lightning sets the epoch through ``sampler.set_epoch`` and saves ``state_dict()`` with a checkpoint; its length
    is known when the part's row count is (else ``len()`` raises TypeError and Lightning counts as it goes).

    Resuming: a loop fetches a loader of unknown length one batch ahead (to see the end coming), so the batches it
    trained on are those handed over less one until the epoch ran out. Lightning hands the saved state over before
    that first fetch but sets the epoch after it, so a pending resume also says which epoch the iterator is in.
    """

    def __init__(self, batches: StreamBatches, num_workers: int = 0) -> None:
        self.batches, self.num_workers = batches, num_workers
        self.sampler = _EpochHolder()
        self.batch_sampler = None
        self.batch_size = batches.batch_size
        self.bad_rows = 0
        self._base: dict[int, int] = {}  # worker -> batches a resumed epoch skipped
        self._order: list[int] = []  # the worker of each batch handed over since (this epoch)
        self._finished = False  # the epoch's batches ran out
        self._resume: tuple[int, dict[int, int]] | None = None
        self._next_epoch: int | None = None  # a resume from an epoch's end: the epoch the next iterator starts

    @property
    def sized(self) -> bool:
        """Whether the length is known (then no loop fetches ahead)."""
        return self.batches.part.total is not None

    def __len__(self) -> int:
        rows = self.batches.part.length
        if rows is None:
            raise TypeError("the streamed split's length is not known")
        workers = max(1, self.num_workers)
        b = self.batch_size
        if self.batches.world > 1:
            per_shard = rows // (self.batches.world * workers)
            return workers * -(-per_shard // b)
        return sum(-(-(rows // workers + (1 if w < rows % workers else 0)) // b) for w in range(workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip: dict[int, int] = {}
        if self._next_epoch is not None:
            self.sampler.epoch, self._next_epoch = max(self.sampler.epoch, self._next_epoch), None
        if self._resume is not None:
            if not self.sized:  # started before Lightning sets the epoch: the saved one is the epoch it resumes
                self.sampler.epoch = max(self.sampler.epoch, self._resume[0])
            if self._resume[0] == self.sampler.epoch:
                skip = dict(self._resume[1])
            self._resume = None
        epoch = self.batches.epoch = self.sampler.epoch
        self.batches.skip = skip
        self._base, self._order, self._finished = dict(skip), [], False
        loader = DataLoader(self.batches, batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            worker, _, bad = batch.pop("stream")
            self._order.append(int(worker))
            self.bad_rows += int(bad)
            yield batch
        if self.sampler.epoch == epoch:
            self._finished = True

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches the loop trained on (``batches``), whether the epoch ran out, and the worker of
        each batch handed over (with what a resume skipped before: ``base``)."""
        ahead = 0 if (self.sized or self._finished or not self._order) else 1
        return {"epoch": self.sampler.epoch, "batches": sum(self._base.values()) + len(self._order) - ahead,
                "finished": self._finished, "base": {str(w): n for w, n in self._base.items()},
                "order": list(self._order[:len(self._order) - ahead])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the saved epoch after the batches the loop trained on (the next epoch when it ran out)."""
        if state.get("finished"):
            self._next_epoch = int(state["epoch"]) + 1
            return
        workers = {int(w): int(n) for w, n in dict(state.get("base", {})).items()}
        for w in state.get("order", []):
            workers[int(w)] = workers.get(int(w), 0) + 1
        if any(workers.values()):
            self._resume = (int(state["epoch"]), workers)
