"""``FusionDataModule``: any Hugging Face ``datasets`` source as batches for a :class:`~zoo.model.FusionModel`.

Batches are ``{"inputs": {modality: preprocessed tensors | cached ModalityOutput}, "labels": ..., "index": [B]}``.
With frozen encoders the features are computed once per split and served from :class:`recipes.cache.FeatureCache`.
How to point it at your own data: docs/data.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from encoders import MODALITIES, ModalityOutput, Preprocessor
from fusion_errors import DataError, InputError

from ._columns import LabelEncoder, infer_labels, pick_splits, raw_cell
from ._row_checks import CheckedFiles, check_cell
from .batches import FeatureBatches
from .cache import FeatureCache, raw_view
from .formats import load_source, load_stream
from .loader import ResumableDataLoader
from .streaming import StreamBatches, StreamLoader, StreamPart, stream_labels, stream_splits

__all__ = ["FusionDataModule", "RawCollate", "CachedCollate", "DEFAULT_COLUMNS", "raw_cell", "encode_inputs"]

DEFAULT_COLUMNS = {"audio": "audio", "image": "image", "label": "label", "text": "text"}
# usual names of a role's column, used when the role's own name is absent and --data.columns does not map it
COLUMN_ALIASES = {
    "text": ("question", "sentence", "caption", "transcript", "review", "comment", "description", "prompt"),
    "image": ("img", "image_path", "image_file", "picture", "photo"),
    "audio": ("audio_path", "audio_file", "wav", "speech", "recording", "sound"),
    "label": ("answer", "labels", "class", "target", "category", "y"),
}
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                "predict": ("test",), None: ("train", "validation", "test")}
BAD_ROWS_SHOWN = 5
NORM_SAMPLE_ROWS = 8192  # training rows the standardisation of encoders not served from the cache is fitted on
CHECK_CHUNK = 4096  # rows per chunk of the row checks
CHECK_PROGRESS_ROWS = 20_000  # splits at least this long show a progress bar while their rows are checked


@dataclass
class _Split:
    """One checked split: its usable rows, their labels and their row numbers in the source split."""

    name: str
    rows: datasets.Dataset
    labels: Tensor  # [N] long | [N, C] float
    row_ids: np.ndarray  # [N]
    stamps: dict[str, str]  # modality -> digest of the files its column points to


Row = tuple[dict[str, Any], Tensor, int, int]  # (raw cells, label, source row id, position in the split)


class _Rows(Dataset):
    """Position ``i`` -> (raw cells, label, source row id, i); preprocessing happens in the collate function."""

    def __init__(self, split: _Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.rows)

    def __getitem__(self, i: int) -> Row:
        return self.split.rows[int(i)], self.split.labels[i], int(self.split.row_ids[i]), int(i)


class RawCollate:
    """Picklable collate: rows of raw cells -> a batch of preprocessed inputs (runs in loader workers).

    Args:
        preprocessors: modality -> the encoder's preprocessor (the modalities whose encoder runs every step).
        columns: modality -> the column holding its raw items.
        base: folder relative paths are resolved against.
        split: split name for error messages.
        cached: the other modalities' cached features, sliced by row position (per-modality cache: a frozen
            encoder's features come from the cache whatever the other encoders do).
    """

    def __init__(self, preprocessors: Mapping[str, Preprocessor], columns: Mapping[str, str], base: Path | None,
                 split: str, cached: CachedCollate | None = None) -> None:
        self.preprocessors, self.columns, self.base, self.split = dict(preprocessors), dict(columns), base, split
        self.cached = cached

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        index = torch.tensor([r[2] for r in rows], dtype=torch.long)  # [B]
        inputs: dict[str, Any] = dict(self.cached([r[3] for r in rows])["inputs"]) if self.cached else {}
        for m in sorted(self.preprocessors):
            items = [raw_cell(m, r[0][self.columns[m]], self.base) for r in rows]
            try:
                inputs[m] = self.preprocessors[m](items)
            except InputError as e:
                raise DataError(self._explain(m, items, index, e)) from e
        return {"inputs": inputs, "labels": torch.stack([r[1] for r in rows]), "index": index}

    def _explain(self, m: str, items: list[Any], index: Tensor, error: InputError) -> str:
        for j, item in enumerate(items):
            try:
                self.preprocessors[m]([item])
            except InputError as e:
                return (f"split {self.split!r}, row {int(index[j])}, column {self.columns[m]!r}: {e} Fix or remove "
                        "that cell (an empty cell is a missing modality).")
        return f"split {self.split!r}, rows {index.tolist()}, column {self.columns[m]!r}: {error}"


class CachedCollate:
    """Picklable collate over cached features: row positions -> a batch of ``ModalityOutput`` slices.

    Tokens are cut to the longest valid token count in the batch (padding beyond it is masked anyway).
    """

    def __init__(self, feats: Mapping[str, ModalityOutput], labels: Tensor, row_ids: np.ndarray) -> None:
        self.batches = FeatureBatches(feats, labels, torch.as_tensor(row_ids, dtype=torch.long))

    def __call__(self, positions: Sequence[int]) -> dict[str, Any]:
        return self.batches.batch(torch.tensor(list(positions), dtype=torch.long))  # [B] positions


def encode_inputs(model: Any, inputs: Mapping[str, Any], device: torch.device | None = None
                  ) -> dict[str, ModalityOutput]:
    """A batch's inputs as encoder features: cached ones as they are, preprocessed ones through the model's encoders
    without gradients (frozen encoders stay in eval mode), moved to ``device`` first when given."""
    out = {}
    with torch.no_grad():
        for m, v in inputs.items():
            if not isinstance(v, ModalityOutput):
                v = model.encoders[m]({k: t.to(device) if device is not None and isinstance(t, Tensor) else t
                                       for k, t in v.items()})
            out[m] = v
    return out


def _pooled_sample(model: Any, modalities: Sequence[str], batches: Any, rows: int,
                   device: torch.device) -> dict[str, ModalityOutput]:
    """Pooled features of ``modalities``' frozen encoders on the first ``rows`` rows of ``batches`` (raw inputs):
    modality -> ModalityOutput [n, 1, D] whose pooled vectors and presence are the encoder's."""
    pooled: dict[str, list[Tensor]] = {m: [] for m in modalities}
    present: dict[str, list[Tensor]] = {m: [] for m in modalities}
    seen = 0
    for batch in batches:
        feats = encode_inputs(model, {m: batch["inputs"][m] for m in modalities}, device)
        for m, f in feats.items():
            pooled[m].append(f.pooled.float().cpu())  # [B, D]
            present[m].append(f.present.cpu())  # [B]
        seen += len(batch["labels"])
        if seen >= rows:
            break
    out = {}
    for m in modalities:
        if pooled[m]:
            p, ok = torch.cat(pooled[m])[:rows], torch.cat(present[m])[:rows]  # [n, D], [n]
            out[m] = ModalityOutput(p[:, None], ok[:, None], p)
    return out


class FusionDataModule(pl.LightningDataModule):
    """Train/validation/test batches from the bundled ``tridigits``, a hub dataset or local files.

    Args:
        dataset: ``tridigits`` (bundled, offline), a Hugging Face hub name, or a local file/folder path.
        data_files: local csv/json/parquet file(s): a path, a list, or {split: path(s)}; overrides ``dataset``.
        data_format: a registered format (``recipes.formats.list_formats()``: csv, json, parquet, tablefolder,
            imagefolder, audiofolder, hub, and any you register); None = from the file suffix or the folder.
        data_dir: a folder with a metadata table (path columns relative to it) or an image/audio folder.
        columns: role -> column name for ``text``, ``image``, ``audio`` and ``label`` (each defaults to its role).
        splits: role -> split name for ``train``, ``validation``, ``test``; missing roles are found by usual names
            or carved at random from train.
        val_fraction: share of train carved out as validation when the data has none.
        test_fraction: share of train carved out as test when the data has none.
        seed: seed of that random carving.
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        cache_features: serve cached encoder features when every encoder of the model is frozen.
        cache_dir: feature cache folder (default ``$FUSION_ZOO_CACHE`` or ``~/.cache/fusion-zoo/features``).
        fold_inference: encode frozen image encoders with BatchNorm folded and channels-last weights (same
            features within 1e-4, about 3x faster on CPU; the cache key records it); False runs them as trained.
        on_bad_rows: ``raise`` on a bad row (bad label, unreadable file) or ``skip`` it (counted in ``bad_rows``).
        max_samples: keep at most this many rows per split (smoke tests).
        labels: label names; None = the ClassLabel names or the sorted unique values of the label column.
        streaming: read the table as an iterable (``recipes/streaming.py``): for tables too large to convert or
            hold; no feature cache (encoders run every step), rows are checked as their batch is built, and
            ``max_samples`` applies per source split.
        shuffle_buffer: rows of the seeded shuffle buffer of a streamed training split.
    """

    def __init__(
        self,
        dataset: str = "tridigits",
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        data_format: str | None = None,
        data_dir: str | None = None,
        columns: dict[str, str] | None = None,
        splits: dict[str, str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        cache_features: bool = True,
        cache_dir: str | None = None,
        fold_inference: bool = True,
        on_bad_rows: Literal["raise", "skip"] = "raise",
        max_samples: int | None = None,
        labels: list[str] | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
    ) -> None:
        super().__init__()
        unknown = sorted(set(columns or {}) - set(DEFAULT_COLUMNS))
        if unknown:
            raise DataError(f"columns keys {unknown} are not roles; use {sorted(DEFAULT_COLUMNS)} -> column names.")
        if on_bad_rows not in ("raise", "skip"):
            raise DataError(f"on_bad_rows={on_bad_rows!r} must be 'raise' or 'skip'.")
        if batch_size < 1 or num_workers < 0 or (max_samples is not None and max_samples < 1) or shuffle_buffer < 1:
            raise DataError("batch_size, max_samples and shuffle_buffer must be >= 1 and num_workers >= 0.")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
            raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1).")
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        self.batch_size, self.num_workers, self.on_bad_rows = batch_size, num_workers, on_bad_rows
        self.cache_features, self.cache = cache_features, FeatureCache(cache_dir, fold=fold_inference)
        self.seed, self.streaming, self.shuffle_buffer = seed, streaming, shuffle_buffer
        self._parts: dict[str, tuple[datasets.Dataset, str, np.ndarray]] = {}
        self._stream: dict[str, StreamPart] = {}
        if streaming:
            streamed, self._base, self.dataset = load_stream(dataset, data_files, data_format, data_dir)
            if max_samples is not None:
                streamed = {k: (ds.take(max_samples), None if n is None else min(n, max_samples))
                            for k, (ds, n) in streamed.items()}
            self._stream = stream_splits({k: ds for k, (ds, _) in streamed.items()},
                                         {k: n for k, (_, n) in streamed.items()}, splits, val_fraction,
                                         test_fraction, seed)
            self._stream_columns: dict[str, list[str]] = {}
        else:
            source, self._base, self.dataset = load_source(dataset, data_files, data_format, data_dir)
            self._parts = pick_splits(source, splits, val_fraction, test_fraction, seed)
            if max_samples is not None:
                self._parts = {r: (ds.select(range(min(max_samples, len(ds)))), name, ids[:max_samples])
                               for r, (ds, name, ids) in self._parts.items()}
        self._alias_columns(set(columns or {}))
        #: the modalities whose column the training split has: with no --model.encoders the columns decide
        self.modalities: list[str] = [m for m in MODALITIES if self.columns[m] in self._column_names("train")]
        for role in self._roles():
            self._need_column(role, "label")
        if labels:
            self.labels: list[str] = [str(x) for x in labels]
        elif streaming:
            self.labels = stream_labels(self._stream["train"], self.columns["label"])
        else:
            self.labels = infer_labels({role: ds for role, (ds, _, _) in self._parts.items()}, self.columns["label"])
        if not self.labels:
            raise DataError(f"label column {self.columns['label']!r} has no values; fill it or pass --data.labels.")
        self.bad_rows: dict[str, int] = {}
        self._model: Any = None
        self._signature: tuple[Any, ...] | None = None
        self._checked: dict[str, _Split] = {}
        self._checked_files: CheckedFiles | None = None  # files that passed their check, by fingerprint

    def _alias_columns(self, mapped: set[str]) -> None:
        """A role not mapped by the user whose own column is absent takes the one usual name present, if exactly one."""
        names = self._column_names("train")
        for role, aliases in COLUMN_ALIASES.items():
            if role in mapped or self.columns[role] in names:
                continue
            found = [a for a in aliases if a in names]
            if len(found) == 1:
                self.columns[role] = found[0]
                rank_zero_info(f"data: using column {found[0]!r} as the {role} column (map another with "
                               f"--data.columns '{{\"{role}\": \"<column>\"}}').")

    def _roles(self) -> list[str]:
        return list(self._stream if self.streaming else self._parts)

    def _column_names(self, role: str) -> list[str]:
        """The columns of ``role``'s split (streamed: its declared features, else the keys of its first row)."""
        if not self.streaming:
            return list(self._parts[role][0].column_names)
        if role not in self._stream_columns:
            part = self._stream[role]
            names = part.rows.column_names
            if names is None:
                first = next(iter(part.rows.take(1)), None)
                if first is None:
                    raise DataError(f"split {part.source!r} (used as {role}) is empty; add rows or choose another "
                                    "split.")
                names = list(first)
            self._stream_columns[role] = list(names)
        return self._stream_columns[role]

    # the model ---------------------------------------------------------------------------------
    def attach(self, model: Any) -> FusionDataModule:
        """Use ``model`` (a FusionModel) for preprocessing and features without a Trainer; returns self."""
        self._model = model
        return self

    def _get_model(self) -> Any:
        if self._model is not None:
            return self._model
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise DataError("FusionDataModule has no model: pass it to a Trainer with a FusionTask, or call "
                            "dm.attach(model) first.")
        return getattr(module, "model", module)

    def _cached_modalities(self, model: Any) -> list[str]:
        """Modalities served from the feature cache: those whose encoder is frozen (per modality)."""
        if not self.cache_features:
            return []
        return [m for m in model.modalities if m in model.encoders and model.encoders[m].finetune == "frozen"]

    def _use_cache(self, model: Any) -> bool:
        """Whether every modality comes from the cache (a step is then only the head's small matmuls)."""
        return len(self._cached_modalities(model)) == len(model.modalities)

    # checks ------------------------------------------------------------------------------------
    def _need_column(self, role: str, key: str) -> None:
        source = self._stream[role].source if self.streaming else self._parts[role][1]
        col, names = self.columns[key], self._column_names(role)
        if col not in names:
            drop = "" if key == "label" else f", or leave {key} out of --model.encoders"
            raise DataError(f"column {col!r} (the {key} column) is not in split {source!r}; available columns: "
                            f"{names}. Map yours with --data.columns '{{\"{key}\": \"<column>\"}}'{drop}.")

    def _check(self, role: str, model: Any) -> _Split:
        """Validate labels and cells of one split; drop (and count) bad rows or raise naming them."""
        ds, source, ids = self._parts[role]
        mods = [m for m in MODALITIES if m in model.modalities]
        if len(ds) == 0:
            raise DataError(f"split {source!r} (used as {role}) is empty; add rows or choose another split.")
        for key in ["label", *mods]:
            self._need_column(role, key)
        cols = {m: self.columns[m] for m in mods}
        for c in cols.values():
            ds = raw_view(ds, c)
        label_col = self.columns["label"]
        encoder = LabelEncoder(model.config.labels, model.config.task, ds.features[label_col])
        chunks = ds.select_columns([label_col]).iter(batch_size=CHECK_CHUNK)  # ds[col] would read row by row
        labels, label_problems = encoder.encode([v for chunk in chunks for v in chunk[label_col]])
        problems = {i: [f"column {label_col!r}: {p}"] for i, p in label_problems.items()}
        digests = {m: hashlib.sha256() for m in mods}
        filled = dict.fromkeys(mods, 0)
        usable = dict.fromkeys(mods, 0)  # cells present and readable
        # a file that passed its check before (same path, size and mtime) is not opened again: a warm run only stats
        if self._checked_files is None:
            self._checked_files = CheckedFiles(self.cache.root)
        checked = self._checked_files
        bar = tqdm(total=len(ds), desc=f"checking rows of {source!r}", unit="row", leave=False, dynamic_ncols=True,
                   disable=len(ds) < CHECK_PROGRESS_ROWS or getattr(rank_zero_only, "rank", 0) != 0)
        start = 0
        for chunk in ds.select_columns(sorted({*cols.values(), label_col})).iter(batch_size=CHECK_CHUNK):
            size = len(chunk[label_col])
            for m, c in cols.items():
                for j, v in enumerate(chunk[c]):
                    v = raw_cell(m, v, self._base)
                    if v is None:
                        continue
                    filled[m] += 1
                    problem, stamp = check_cell(m, v, checked)
                    if problem:
                        problems.setdefault(start + j, []).append(f"column {c!r}: {problem}")
                    else:
                        usable[m] += 1
                    digests[m].update(stamp.encode())
            start += size
            bar.update(size)
        bar.close()
        checked.save()
        for m in [m for m in mods if not usable[m]] if role == "train" else []:  # nothing to learn the modality from
            state = "is empty in every row" if not filled[m] else f"has no usable value ({filled[m]} unreadable)"
            said = (f"column {cols[m]!r} (the {m} column) {state} of split {source!r}; fill it, map another column "
                    f"with --data.columns '{{\"{m}\": \"<column>\"}}' or leave {m} out of --model.encoders")
            if self.on_bad_rows == "raise":
                raise DataError(f"{said} (--data.on_bad_rows skip trains without it).")
            rank_zero_warn(f"{said}; training with {m} missing in every row (on_bad_rows='skip').")
        bad = sorted(problems)
        if bad and self.on_bad_rows == "raise":
            shown = "\n  ".join(f"row {ids[i]}: {'; '.join(problems[i])}" for i in bad[:BAD_ROWS_SHOWN])
            more = f"\n  ... and {len(bad) - BAD_ROWS_SHOWN} more" if len(bad) > BAD_ROWS_SHOWN else ""
            raise DataError(f"{len(bad)} bad row(s) in split {source!r} (used as {role}; rows are 0-based in that "
                            f"split):\n  {shown}{more}\nFix them, or pass --data.on_bad_rows skip to drop and count "
                            "them.")
        if bad:
            keep = np.setdiff1d(np.arange(len(ds)), bad)
            ds, labels, ids = ds.select(keep), labels[torch.as_tensor(keep)], ids[keep]
        if len(ds) == 0:
            raise DataError(f"every row of split {source!r} (used as {role}) is bad; fix the data.")
        self.bad_rows[role] = len(bad)
        ds = ds.select_columns(sorted(set(cols.values())))
        return _Split(role, ds, labels, ids, {m: d.hexdigest() for m, d in digests.items()})

    # Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Check the splits ``stage`` needs and, with frozen encoders, compute (or load) their features."""
        model = self._get_model()
        signature = (id(model), tuple(model.modalities), model.config.task, tuple(model.config.labels))
        if signature != self._signature:
            self._signature, self._checked, self.bad_rows = signature, {}, {}
        roles = STAGE_SPLITS.get(stage, STAGE_SPLITS[None])
        if self.streaming:  # rows are checked as their batches are built
            for role in roles:
                for key in ["label", *[m for m in MODALITIES if m in model.modalities]]:
                    self._need_column(role, key)
            return
        for role in roles:
            if role not in self._checked:
                self._checked[role] = self._check(role, model)
        for role in roles:  # every process runs setup: under DDP they split the encoding of a cache miss
            self._features(role, model, shared=True)
        skipped = {r: n for r, n in self.bad_rows.items() if n}
        if skipped:
            rank_zero_info(f"data: skipped bad rows per split {skipped} (on_bad_rows='skip').")

    def _features(self, role: str, model: Any, shared: bool = False) -> dict[str, ModalityOutput]:
        split = self._checked[role]
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        feats = {}
        for m in self._cached_modalities(model):
            col, start = self.columns[m], time.perf_counter()
            feats[m], stats = self.cache.get_or_compute(
                model.encoders[m], split.rows, col, split=role, store_tokens=model.config.needs_tokens,
                batch_size=max(self.batch_size, model.encoders[m].encode_batch_size),
                transform=functools.partial(raw_cell, m, base=self._base),
                extra=split.stamps[m], device=device, row_ids=split.row_ids.tolist(), shared=shared)
            if stats.source != "memory":
                rank_zero_info(f"feature cache {stats.source:<8} {role}/{m}: {stats.rows} rows, "
                               f"{stats.bytes / 2**20:.1f} MiB in {time.perf_counter() - start:.2f}s "
                               f"({self.cache.path(stats.key)})")
        return feats

    def _loader(self, role: str, shuffle: bool) -> DataLoader | FeatureBatches | StreamLoader:
        model = self._get_model()
        if self.streaming:
            return self._stream_loader(role, model, shuffle)
        if role not in self._checked or self._signature is None or self._signature[0] != id(model):
            self.setup({"train": "fit", "validation": "validate"}.get(role, "test"))
        split = self._checked[role]
        workers: dict[str, Any] = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        # asked again here: a restored checkpoint may have changed the weights (the key has the weights hash)
        feats = self._features(role, model)
        cached = CachedCollate(feats, split.labels, split.row_ids) if feats else None
        live = [m for m in model.modalities if m not in feats]  # encoders that run every step
        if not live:  # a head-only step: batches are index slices of the in-memory feature tensors
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            return FeatureBatches(feats, split.labels, torch.as_tensor(split.row_ids, dtype=torch.long),
                                  self.batch_size, shuffle, self.seed, tokens=model.config.needs_tokens,
                                  rank=rank, world=world)
        missing = [m for m in live if m not in model.encoders]
        if missing:
            raise DataError(f"this head-only model has no {missing} encoder(s) to preprocess raw data; build it "
                            "with encoders (FusionModel(config)).")
        preprocessors = {m: model.encoders[m].preprocessor for m in live}
        collate = RawCollate(preprocessors, {m: self.columns[m] for m in live}, self._base, role, cached)
        return self._make_loader(_Rows(split), shuffle, collate, workers)

    def _stream_loader(self, role: str, model: Any, shuffle: bool, modalities: Sequence[str] | None = None,
                       shard: tuple[int, int] | None = None) -> StreamLoader:
        """Batches of a streamed split: every encoder runs each step (no feature cache). ``modalities``: those to
        preprocess (default: the model's); ``shard``: (rank, world) instead of the trainer's."""
        self.setup({"train": "fit", "validation": "validate"}.get(role, "test"))
        mods = list(model.modalities if modalities is None else modalities)
        missing = [m for m in mods if m not in model.encoders]
        if missing:
            raise DataError(f"this head-only model has no {missing} encoder(s) to preprocess raw data; build it "
                            "with encoders (FusionModel(config)).")
        part = self._stream[role]
        for m in mods:  # image/audio cells reach the preprocessors undecoded, as in the cached path
            part = dataclasses.replace(part, rows=raw_view(part.rows, self.columns[m]))
        features = part.rows.features
        label_col = self.columns["label"]
        encoder = LabelEncoder(model.config.labels, model.config.task,
                               features[label_col] if features is not None and label_col in features else None)
        trainer = self.trainer
        rank, world = shard or ((trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1))
        batches = StreamBatches(part, {m: model.encoders[m].preprocessor for m in mods},
                                {m: self.columns[m] for m in mods}, label_col, encoder, self._base,
                                self.batch_size, shuffle, self.shuffle_buffer, self.seed, rank, world,
                                self.on_bad_rows)
        return StreamLoader(batches, self.num_workers)

    def _make_loader(self, dataset: Any, shuffle: bool, collate: Any, workers: dict[str, Any]) -> DataLoader:
        """Training order is a seeded shuffle per epoch that Lightning can checkpoint and resume mid-epoch."""
        if shuffle:
            return ResumableDataLoader(dataset, self.batch_size, seed=self.seed, shuffle=True, collate_fn=collate,
                                       **workers)
        return DataLoader(dataset, self.batch_size, shuffle=False, collate_fn=collate, **workers)

    @property
    def train_size(self) -> int | None:
        """Rows of the training split as read (before bad rows are dropped): what an epoch's length is sized by
        (None for a streamed split of unknown length)."""
        if self.streaming:
            return self._stream["train"].length
        return len(self._parts["train"][0])

    def train_features(self) -> dict[str, ModalityOutput]:
        """Training features of the frozen encoders, for the feature standardisation (and the probe): the whole
        split's cached features (modality -> ModalityOutput over its N rows) of the modalities served from the
        cache, and for frozen encoders that are not their pooled features on ``NORM_SAMPLE_ROWS`` training rows,
        encoded in memory: a seeded sample of the split (``cache_features=False``), or the first rows out of the
        seeded shuffle buffer (``--data.streaming``: a stream has no random access)."""
        model = self._get_model()
        frozen = [m for m in model.modalities if m in model.encoders and model.encoders[m].finetune == "frozen"]
        if self.streaming:
            # rank 0's shard on every process: each fits the same statistics
            loader: Any = self._stream_loader("train", model, True, frozen, shard=(0, 1)) if frozen else []
            return _pooled_sample(model, frozen, loader, NORM_SAMPLE_ROWS, self._device())
        self._ensure_train()
        feats = self._features("train", model)
        rest = [m for m in frozen if m not in feats]
        if rest:
            split = self._checked["train"]
            pick = np.sort(np.random.default_rng(self.seed).permutation(len(split.rows))[:NORM_SAMPLE_ROWS])
            collate = RawCollate({m: model.encoders[m].preprocessor for m in rest},
                                 {m: self.columns[m] for m in rest}, self._base, "train")
            rows = DataLoader(torch.utils.data.Subset(_Rows(split), pick.tolist()), self.batch_size,
                              collate_fn=collate)
            feats = {**feats, **_pooled_sample(model, rest, rows, NORM_SAMPLE_ROWS, self._device())}
        return feats

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_labels(self) -> Tensor:
        """The training split's labels after row checks ([N] class indices | [N, C] multilabel targets), for
        ``class_weights='balanced'``."""
        if self.streaming:
            raise DataError("class_weights='balanced' counts every training label up front, which --data.streaming "
                            "does not read; give the weights (a list, or a dict label -> weight).")
        self._ensure_train()
        return self._checked["train"].labels

    def _ensure_train(self) -> None:
        """Check the training split (``setup("fit")``) unless it was checked for the current model."""
        if "train" not in self._checked or self._signature is None or self._signature[0] != id(self._get_model()):
            self.setup("fit")

    def train_dataloader(self) -> DataLoader | FeatureBatches | StreamLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | FeatureBatches | StreamLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader | FeatureBatches | StreamLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | FeatureBatches | StreamLoader:
        return self._loader("test", shuffle=False)
