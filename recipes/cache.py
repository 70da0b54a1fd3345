"""On-disk cache of frozen-encoder features: encode a dataset column once, reuse it in every later run.

An entry is one safetensors file ``<root>/<key>.safetensors`` holding ``tokens`` [N, T, D] float32, ``mask`` [N, T]
bool and ``pooled`` [N, D] float32 for all N rows of one (split, column). ``key`` is the sha256 of everything the
features depend on: the encoder's spec (name and options) and ``weights_hash()``, the preprocessor's class and
``to_dict()``, the dataset fingerprint, column, whether tokens are stored, and an ``extra`` string (the data
module passes a digest of the sizes and modification times of files the column points to). Change any of these
and the entry is simply not found; nothing is ever invalidated in place. The split's name is not in the key, so
``fit``, ``test``, a dataset-level predict and ``sweep`` share entries; an entry with tokens also serves a
pooled-only request. Identical cells (same text, same path, same bytes) are encoded once. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from encoders import Encoder, ModalityOutput
from encoders._atomic import atomic_write
from fusion_errors import DataError, InputError
from zoo.optimize import (
    INFERENCE_TAG_FOLDED,
    INFERENCE_TAG_GRAPH,
    INFERENCE_TAG_PLAIN,
    count_batchnorms,
    graph_available,
    inference_copy,
    run_in_chunks,
)

__all__ = ["clean_stale_temps", "FeatureCache", "CacheStats", "default_cache_dir", "raw_view", "CACHE_ENV"]

CACHE_ENV = "FUSION_ZOO_CACHE"
# 2: images are turned upright by their EXIF orientation, big JPEGs decode at a reduced DCT scale (encoders._image_io)
FORMAT_VERSION = 2
MEMORY_LIMIT_BYTES = 4 << 30  # the in-process index keeps at most this much, least recently used dropped first
_MEMORY: OrderedDict[str, ModalityOutput] = OrderedDict()


# temp files of this project's atomic writes: ``.<name>.<pid>-<hex>.tmp`` (encoders/_atomic.py) and
# ``.<name>.<pid>.<ns>.tmp`` (cache entries); the pid tells whether the writer is still alive
_TEMP = re.compile(r"^\..+\.(\d+)[.-][0-9a-f]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process, or unknowable: keep the file
    return True


def clean_stale_temps(folder: str | Path) -> int:
    """Delete this project's temp files in ``folder`` whose writing process is gone (a killed save); returns how
    many. Temp files of live processes, and every other file, are left alone."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder yet
        return 0
    for path in entries:
        match = _TEMP.match(path.name)
        if match and path.is_file() and not path.is_symlink() and not _alive(int(match.group(1))):
            try:
                path.unlink()
                removed += 1
            except OSError:
                continue
    return removed


def default_cache_dir() -> Path:
    """``$FUSION_ZOO_CACHE`` if set, else ``~/.cache/fusion-zoo/features``."""
    given = os.environ.get(CACHE_ENV)
    return Path(given).expanduser() if given else Path.home() / ".cache" / "fusion-zoo" / "features"


def raw_view(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """``dataset`` with ``column`` undecoded: ``datasets.Image``/``Audio`` give ``{"bytes", "path"}`` dicts.

    Audio decoding in ``datasets`` needs torchcodec/FFmpeg; the encoders' preprocessors decode raw forms themselves.
    """
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        return dataset.cast_column(column, datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _nbytes(out: ModalityOutput) -> int:
    return sum(t.numel() * t.element_size() for t in (out.tokens, out.mask, out.pooled))


def _identity(item: Any) -> Any:
    """What makes two cells the same input: the text or path string, the bytes' digest, an array's contents."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        data = item.get("bytes")
        if data:
            return ("bytes", hashlib.sha256(bytes(data)).hexdigest())
        if item.get("path"):
            return ("path", str(item["path"]))
        if "array" in item:
            return _identity(item["array"]), item.get("sampling_rate")
    if isinstance(item, (list, tuple)):
        return tuple(_identity(x) for x in item)
    if hasattr(item, "tobytes") and hasattr(item, "shape"):
        return ("array", tuple(item.shape), str(getattr(item, "dtype", "")),
                hashlib.sha256(item.tobytes()).hexdigest())
    if isinstance(item, (int, float, bool)):
        return item
    return ("object", id(item))  # unknown kinds: never merged


def _describe(item: Any) -> str:
    if isinstance(item, (str, Path)):
        return repr(str(item))
    if isinstance(item, dict) and item.get("path"):
        return repr(str(item["path"]))
    return type(item).__name__


def read_ahead(device: torch.device) -> bool:
    """Whether the feature cache reads the next batch in a thread while it encodes one: when the encoder runs on an
    accelerator (the CPU is free) or a CPU core is left over by torch's threads. On a CPU that torch's threads fill,
    a reader thread slows the encoder more than it saves (2 cores, 2 threads, folded EfficientNet-Lite0: 49.6 -> 45.4
    images/s on tridigits, 52.3 -> 46.6 on easy-VQA; beside 1 thread: 30.4 -> 34.9 on tridigits, 32.8 -> 32.9 on
    easy-VQA, docs/data.md)."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


def _prepared(prepare: Callable[[int], tuple[int, Any] | None], ahead: bool) -> Iterator[tuple[int, Any]]:
    """``prepare(start)`` for consecutive batches, in order; with ``ahead``, one thread prepares the next batch
    while the caller works on this one (decoding, resizing and the encoder's kernels release the GIL), never more
    than one batch ahead, so memory stays bounded at two batches."""
    start = 0
    if not ahead:
        while (ready := prepare(start)) is not None:
            start += ready[0]
            yield ready
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fz-cache-read") as reader:
        pending = reader.submit(prepare, start)
        while (ready := pending.result()) is not None:
            start += ready[0]
            pending = reader.submit(prepare, start)
            yield ready


@dataclass
class CacheStats:
    """How one ``get_or_compute`` call was served.

    Attributes:
        key: the entry's sha256 key.
        source: ``memory`` (in-process index), ``disk`` (safetensors file) or ``computed`` (a miss, now stored).
        rows: N, rows in the entry.
        bytes: size of the features in memory.
        seconds: wall time of the call.
    """

    key: str
    source: Literal["memory", "disk", "computed"]
    rows: int
    bytes: int
    seconds: float

    @property
    def hit(self) -> bool:
        return self.source != "computed"


class FeatureCache:
    """Features of frozen encoders over dataset columns, on disk under ``root`` and indexed in memory.

    Args:
        root: folder of the safetensors entries (default :func:`default_cache_dir`).
        memory: keep loaded entries in a process-wide index, so repeated calls are free.
    """

    def __init__(self, root: str | Path | None = None, memory: bool = True, fold: bool = True,
                 graph: bool = False) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.memory = memory
        self.fold = fold  # encode frozen image encoders BatchNorm-folded and channels-last (zoo.optimize)
        # opt-in: run the folded copy as a TorchScript graph (zoo.optimize.GraphEncode); ~1.4x faster on CPU, but
        # its features differ from the plain encoder's by up to 1.4e-4 on easy-VQA images, above the 1e-4 of folding
        self.graph = graph
        clean_stale_temps(self.root)  # left by saves that were killed

    @staticmethod
    def clear_memory() -> None:
        """Forget every entry of the in-process index (files on disk stay)."""
        _MEMORY.clear()

    def key_parts(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str,
                  store_tokens: bool, extra: str = "") -> dict[str, Any]:
        """Everything an entry depends on, as a JSON-able dict (the key is its sha256)."""
        pre = encoder.preprocessor
        return {
            "format": FORMAT_VERSION,
            "encoder": getattr(encoder, "spec", None) or {"name": type(encoder).__qualname__},
            "weights": encoder.weights_hash(),
            "preprocessor": {"class": type(pre).__qualname__, **pre.to_dict()},
            "dataset": dataset._fingerprint,
            "extra": extra,
            "column": column,
            "tokens": bool(store_tokens),
            "inference": self._inference_tag(encoder),
        }

    def _inference_tag(self, encoder: Encoder) -> str:
        """How a miss runs ``encoder`` (``zoo.optimize.inference_copy``'s tag), known without folding it."""
        foldable = self.fold and encoder.modality == "image" and not any(p.requires_grad for p in encoder.parameters())
        if not (foldable and count_batchnorms(encoder)):
            return INFERENCE_TAG_PLAIN
        return INFERENCE_TAG_GRAPH if self.graph and graph_available() else INFERENCE_TAG_FOLDED

    def key(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str = "train",
            store_tokens: bool = True, extra: str = "") -> str:
        """sha256 hex digest of :meth:`key_parts`."""
        parts = self.key_parts(encoder, dataset, column, split, store_tokens, extra)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get_or_compute(
        self,
        encoder: Encoder,
        dataset: datasets.Dataset,
        column: str,
        split: str = "train",
        *,
        store_tokens: bool = True,
        batch_size: int = 64,
        transform: Callable[[Any], Any] | None = None,
        extra: str = "",
        device: torch.device | str | None = None,
        row_ids: Sequence[int] | None = None,
    ) -> tuple[ModalityOutput, CacheStats]:
        """Features of ``encoder`` over every row of ``dataset[column]``, from the cache or computed and stored.

        Args:
            encoder: a (frozen) encoder; its ``preprocessor`` turns the raw cells into a batch.
            dataset: the rows, in order; a None cell is a missing modality (mask all False, pooled zeros).
            column: the column holding the raw items.
            split: split name (part of the key and of error messages).
            store_tokens: keep per-token features; False keeps pooled only, as one token with mask = present.
            batch_size: rows per encoder call on a miss.
            transform: applied to each non-None cell before preprocessing (e.g. resolving relative paths).
            extra: more text for the key (e.g. a digest of the files the column points to).
            device: where to run the encoder on a miss (default: where its parameters are).
            row_ids: the row numbers error messages name (default 0..N-1).

        Returns:
            (ModalityOutput with tokens [N, T, D] float32, mask [N, T] bool, pooled [N, D] float32 on the CPU,
            CacheStats). T is the longest token count over all batches; shorter rows are padded with mask False.
        """
        start = time.perf_counter()
        dataset = raw_view(dataset, column)
        key = self.key(encoder, dataset, column, split, store_tokens, extra)
        out, source = (_MEMORY.get(key) if self.memory else None), "memory"
        if out is not None:
            _MEMORY.move_to_end(key)
        else:
            out, source = self._load(self.path(key), len(dataset)), "disk"
            if out is None and not store_tokens:  # an entry with tokens serves a pooled-only request too
                full = self._load(self.path(self.key(encoder, dataset, column, split, True, extra)), len(dataset))
                if full is not None:
                    out = ModalityOutput(full.pooled[:, None], full.present[:, None], full.pooled)
            if out is None:
                out, source = self._compute(encoder, dataset, column, split, store_tokens, batch_size, transform,
                                            device, row_ids), "computed"
                self._save(self.path(key), out, self.key_parts(encoder, dataset, column, split, store_tokens, extra))
            self._remember(key, out)
        return out, CacheStats(key, source, out.batch_size, _nbytes(out), time.perf_counter() - start)  # type: ignore

    # storage -----------------------------------------------------------------------------------
    def _remember(self, key: str, out: ModalityOutput) -> None:
        if not self.memory:
            return
        _MEMORY[key] = out
        while len(_MEMORY) > 1 and sum(_nbytes(o) for o in _MEMORY.values()) > MEMORY_LIMIT_BYTES:
            _MEMORY.popitem(last=False)

    @staticmethod
    def _load(path: Path, rows: int) -> ModalityOutput | None:
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            out = ModalityOutput(t["tokens"], t["mask"], t["pooled"]).validate(str(path))
        except (SafetensorError, KeyError, InputError, OSError) as e:
            rank_zero_warn(f"feature cache entry {path} is unreadable ({e}); encoding again.")
            return None
        if out.batch_size != rows:
            rank_zero_warn(f"feature cache entry {path} has {out.batch_size} rows, expected {rows}; encoding again.")
            return None
        if not (torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()):
            rank_zero_warn(f"feature cache entry {path} holds NaN/inf features (a corrupt or tampered file); "
                           "encoding again.")
            return None
        return out

    @staticmethod
    def _save(path: Path, out: ModalityOutput, parts: dict[str, Any]) -> None:
        tensors = {"tokens": out.tokens.contiguous(), "mask": out.mask.contiguous(), "pooled": out.pooled.contiguous()}
        with atomic_write(path) as tmp:  # readers see the old state or the whole new file
            save_file(tensors, str(tmp), metadata={"key_parts": json.dumps(parts, sort_keys=True, default=str)})

    # encoding ----------------------------------------------------------------------------------
    def _compute(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str, store_tokens: bool,
                 batch_size: int, transform: Callable[[Any], Any] | None, device: torch.device | str | None,
                 row_ids: Sequence[int] | None) -> ModalityOutput:
        """Encode each distinct non-missing cell once, then lay the features out over all N rows."""
        n = len(dataset)
        column_only = dataset.select_columns([column])
        slot: list[int] = []  # row -> index of its distinct cell, -1 = missing
        first: dict[Any, int] = {}
        distinct_rows: list[int] = []
        row = 0
        for chunk in column_only.iter(batch_size=1024):
            for v in chunk[column]:
                if v is None:
                    slot.append(-1)
                else:
                    k = _identity(v)
                    if k not in first:
                        first[k] = len(distinct_rows)
                        distinct_rows.append(row)
                    slot.append(first[k])
                row += 1
        ids = list(row_ids) if row_ids is not None else list(range(n))
        if not distinct_rows:  # every cell missing: absent everywhere
            d = int(encoder.embed_dim)
            return ModalityOutput(torch.zeros(n, 1, d), torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, d))
        todo = column_only if len(distinct_rows) == n else column_only.select(distinct_rows)
        out = self._encode(encoder, todo, column, split, store_tokens, batch_size, transform, device,
                           [ids[r] for r in distinct_rows], n)
        index = torch.tensor(slot, dtype=torch.long)  # [N]
        present = index >= 0  # [N]
        if len(distinct_rows) == n and bool(present.all()):
            return out
        safe = index.clamp_min(0)
        keep = present[:, None]
        return ModalityOutput(out.tokens[safe] * keep[..., None], out.mask[safe] & keep,
                              out.pooled[safe] * keep)  # [N, T, D], [N, T], [N, D]

    def _encode(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str, store_tokens: bool,
                batch_size: int, transform: Callable[[Any], Any] | None, device: torch.device | str | None,
                row_ids: Sequence[int], total: int) -> ModalityOutput:
        n = len(dataset)
        name = (getattr(encoder, "spec", None) or {}).get("name", type(encoder).__name__)
        home = next(encoder.parameters(), torch.empty(0)).device
        device = torch.device(device) if device is not None else home
        was_training = encoder.training
        encoder.to(device).eval()
        # a folded copy when the key says so (same features within 1e-4, ~3x faster on CPU); if folding fails its
        # own check the plain encoder runs, which gives those same features
        # (its graph, zoo.optimize.GraphEncode, is built on the first batch: a miss runs many batches of one shape)
        runner = inference_copy(encoder, self.fold, graph=self.graph, graph_after=1)[0] \
            if self._inference_tag(encoder) != INFERENCE_TAG_PLAIN else encoder
        parts: list[ModalityOutput] = []
        step = max(1, (n // batch_size + 1) // 10) * batch_size
        rank_zero_info(f"feature cache: encoding {split}/{column} ({total} rows, {n} distinct) with {name} on {device}")
        chunks = iter(dataset.select_columns([column]).iter(batch_size=batch_size))

        def prepare(start: int) -> tuple[int, dict[str, torch.Tensor]] | None:
            """Read, decode and preprocess the batch that starts at row ``start`` (None past the end)."""
            chunk = next(chunks, None)
            if chunk is None:
                return None
            items = [None if v is None else transform(v) if transform else v for v in chunk[column]]
            return len(items), self._preprocess(encoder, items, split, column, start, row_ids)

        done = 0
        try:
            for size, batch in _prepared(prepare, read_ahead(device)):
                with torch.inference_mode():
                    # CPU image batches run in cache-sized chunks, folded or not (zoo.optimize.CHUNK_PIXELS)
                    out = run_in_chunks(runner, {k: v.to(device) for k, v in batch.items()}, device)
                    if not store_tokens:
                        out = ModalityOutput(out.pooled[:, None], out.present[:, None], out.pooled)
                    parts.append(ModalityOutput(out.tokens.float().cpu(), out.mask.cpu(), out.pooled.float().cpu()))
                done += size
                if done % step == 0 and done < n:
                    rank_zero_info(f"feature cache: {split}/{column} {done}/{n} rows")
        finally:
            encoder.to(home).train(was_training)
        return self._stack(parts, n)

    @staticmethod
    def _preprocess(encoder: Encoder, items: list[Any], split: str, column: str, start: int,
                    row_ids: Sequence[int] | None) -> dict[str, torch.Tensor]:
        """Preprocess one batch; an unusable item becomes a DataError naming its row, column and file."""
        try:
            return encoder.preprocessor(items)
        except InputError as batch_error:
            for j, item in enumerate(items):
                try:
                    encoder.preprocessor([item])
                except InputError as e:
                    row = row_ids[start + j] if row_ids is not None else start + j
                    raise DataError(f"split {split!r}, row {row}, column {column!r} ({_describe(item)}): {e} Fix or "
                                    "remove it, or pass --data.on_bad_rows skip to drop unreadable rows.") from e
            raise DataError(f"split {split!r}, rows {start}..{start + len(items) - 1}, column {column!r}: "
                            f"{batch_error}") from batch_error

    @staticmethod
    def _stack(parts: list[ModalityOutput], n: int) -> ModalityOutput:
        """Concatenate batches (made outside inference mode, so training may use them), padding T with mask False."""
        if not parts:
            raise DataError("nothing to encode: the split has no rows.")
        t = max(p.tokens.shape[1] for p in parts)
        d = parts[0].dim
        tokens = torch.zeros(n, t, d)  # [N, T, D]
        mask = torch.zeros(n, t, dtype=torch.bool)  # [N, T]
        pooled = torch.zeros(n, d)  # [N, D]
        row = 0
        for p in parts:
            b, tp = p.batch_size, p.tokens.shape[1]
            tokens[row:row + b, :tp] = p.tokens
            mask[row:row + b, :tp] = p.mask
            pooled[row:row + b] = p.pooled
            row += b
        return ModalityOutput(tokens, mask, pooled)
