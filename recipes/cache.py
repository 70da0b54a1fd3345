"""On-disk cache of frozen-encoder features: encode a dataset column once, reuse it in every later run.

An entry is a folder ``<root>/<key>.features`` (:mod:`recipes.feature_store`): the distinct rows' features in
fixed-size row shards, written while encoding (memory bounded by a shard), read back a batch's rows at a time
(memory bounded by the batches in use), pooled vectors stored once, tokens unpadded and padded per batch. It
appears by one rename of its temp folder, so readers see the whole entry or none; values are checked finite once,
when written. Under DDP (``shared=True``) the processes split a miss's encoding into blocks of one entry.
``key`` is the sha256 of everything the features depend on: the encoder's spec (name and options) and
``weights_hash()``, the preprocessor's class and ``to_dict()``, the dataset fingerprint, column, whether tokens are
stored, and an ``extra`` string (the data module passes a digest of the sizes and modification times of files the
column points to). Change any of these and the entry is simply not found; nothing is ever invalidated in place.
The split's name is not in the key, so ``fit``, ``test``, a dataset-level predict and ``sweep`` share entries; an
entry with tokens also serves a pooled-only request. Identical cells (same text, same path, same bytes) are encoded
once. Entries of the single-file format 2 (``<key>.safetensors``) are converted once, with a notice. See
docs/data.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import datasets
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from safetensors.torch import load_file

from encoders import Encoder, ModalityOutput
from fusion_common.atomic import HOST_TAG, swap_folder, temp_name
from fusion_errors import DataError, InputError
from zoo.fold import count_batchnorms
from zoo.graph import graph_available
from zoo.optimize import INFERENCE_TAG_FOLDED, INFERENCE_TAG_GRAPH, INFERENCE_TAG_PLAIN, inference_copy

from .chunks import run_in_chunks
from .feature_store import CorruptEntry, StoredFeatures, StoreWriter, fixed_shard_rows, merge_parts, open_entry

__all__ = ["clean_stale_temps", "FeatureCache", "CacheStats", "default_cache_dir", "raw_view", "CACHE_ENV"]

CACHE_ENV = "FUSION_ZOO_CACHE"
# 2: images are turned upright by their EXIF orientation, big JPEGs decode at a reduced DCT scale (encoders._image_io)
# 3: a folder of memory-mapped row shards per entry (recipes.feature_store); the features are those of 2
FORMAT_VERSION = 3
LEGACY_FORMAT = 2  # single-file safetensors entries, converted on first use
ENTRY_SUFFIX = ".features"
# the in-process index keeps at most this many bytes held in RAM (memory-mapped entries cost only their per-row
# slots and flags), least recently used dropped first
MEMORY_LIMIT_BYTES = 4 << 30
_MEMORY: OrderedDict[str, ModalityOutput] = OrderedDict()


# temp files of this project's writes: ``.<name>.<host>-<pid>-<hex>.tmp`` (fusion_common.atomic.temp_name), and
# ``.<name>.<pid>[.-]<hex>.tmp`` from versions that did not name the machine
_TEMP = re.compile(r"^\..+\.([0-9a-f]{8})-(\d+)-[0-9a-f]+\.tmp$")
_TEMP_NO_HOST = re.compile(r"^\..+\.(\d+)[.-][0-9a-f]+\.tmp$")
#: a temp file of another machine (whose process cannot be asked) is stale once untouched this long
OTHER_HOST_STALE_SECONDS = 24 * 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process, or unknowable: keep the file
    return True


def _stale(path: Path) -> bool:
    """Whether ``path`` is a temp file or folder of a writer that is gone: on this machine its process is not
    alive; on another machine (a shared folder) it has not changed for ``OTHER_HOST_STALE_SECONDS``."""
    match = _TEMP.match(path.name)
    if match is not None:
        if match.group(1) == HOST_TAG:
            return not _alive(int(match.group(2)))
        try:
            return time.time() - path.stat().st_mtime > OTHER_HOST_STALE_SECONDS
        except OSError:
            return False
    old = _TEMP_NO_HOST.match(path.name)
    return old is not None and not _alive(int(old.group(1)))


def clean_stale_temps(folder: str | Path) -> int:
    """Delete this project's temp files and entry folders in ``folder`` whose writer is gone (a killed save);
    returns how many. Those of live writers (and of other machines, for a day), and every other file, stay."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder yet
        return 0
    for path in entries:
        if _stale(path) and not path.is_symlink():
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.is_file():
                    path.unlink()
                else:
                    continue
                removed += 1
            except OSError:
                continue
    return removed


def default_cache_dir() -> Path:
    """``$FUSION_ZOO_CACHE`` if set, else ``~/.cache/fusion-zoo/features``."""
    given = os.environ.get(CACHE_ENV)
    return Path(given).expanduser() if given else Path.home() / ".cache" / "fusion-zoo" / "features"


_Rows = TypeVar("_Rows", datasets.Dataset, datasets.IterableDataset)


def raw_view(dataset: _Rows, column: str) -> _Rows:
    """``dataset`` (in memory or streamed) with ``column`` undecoded: ``datasets.Image``/``Audio`` give
    ``{"bytes", "path"}`` dicts.

    Audio decoding in ``datasets`` needs torchcodec/FFmpeg; the encoders' preprocessors decode raw forms themselves.
    """
    feature = (dataset.features or {}).get(column)  # a streamed CSV has no declared features
    if isinstance(feature, datasets.Audio) and feature.decode:
        return dataset.cast_column(column, datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _nbytes(out: ModalityOutput) -> int:
    """Bytes ``out`` holds in RAM: a memory-mapped entry only its per-row slots and flags."""
    if isinstance(out, StoredFeatures):
        return out.resident_bytes
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


def _distinct(column_only: datasets.Dataset, column: str) -> tuple[list[int], list[int]]:
    """(slot of each row, -1 = missing; the first row of each distinct cell): identical cells share one slot."""
    slot: list[int] = []
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
    return slot, distinct_rows


def _describe(item: Any) -> str:
    if isinstance(item, (str, Path)):
        return repr(str(item))
    if isinstance(item, dict) and item.get("path"):
        return repr(str(item["path"]))
    return type(item).__name__


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full (OSError ENOSPC, or safetensors' text for it)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def _disk_full_message(root: Path, writer: StoreWriter, distinct: int, what: str) -> str:
    """One line: the cache folder, the space the entry needs (extrapolated from what was written) and what is free."""
    try:
        written = sum(f.stat().st_size for f in writer.folder.iterdir())
        free = f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free"
    except OSError:
        written, free = 0, "free space unknown"
    done = sum(int(s["rows"]) for s in writer.shards)
    per_row = written / done if done else 4 * writer.dim  # at least the pooled vector of each row
    return (f"no space left on the device of the feature cache {root} while writing {what}: the entry needs about "
            f"{per_row * distinct / 2**20:,.0f} MiB ({free}); the partial entry was removed. Free some space, point "
            "--data.cache_dir (or $FUSION_ZOO_CACHE) at a larger disk, or pass --data.cache_features false.")


def process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group when it holds several processes, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(value: Any, world: int) -> list[Any]:
    """``value`` of every process of the group, in rank order."""
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def read_ahead(device: torch.device) -> bool:
    """Whether the feature cache reads the next batch in a thread while it encodes one: when the encoder runs on an
    accelerator (the CPU is free) or a CPU core is left over by torch's threads. On a CPU that torch's threads fill,
    a reader thread slows the encoder more than it saves (measurements in docs/benchmarks.md)."""
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
        source: ``memory`` (in-process index), ``disk`` (an entry folder) or ``computed`` (a miss, now stored).
        rows: N, rows in the entry.
        bytes: size of the entry's features on disk (read by memory map, not held in RAM).
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
        root: folder of the entries (default :func:`default_cache_dir`).
        memory: keep loaded entries in a process-wide index, so repeated calls are free.
    """

    def __init__(self, root: str | Path | None = None, memory: bool = True, fold: bool = True,
                 graph: bool = False) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.memory = memory
        self.fold = fold  # encode frozen image encoders BatchNorm-folded and channels-last (zoo.optimize)
        # opt-in: run the folded copy as a TorchScript graph (zoo.graph.GraphEncode); faster on some CPUs, but its
        # features can differ from the plain encoder's by more than the 1e-4 of folding (docs/benchmarks.md)
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
        return _digest(self.key_parts(encoder, dataset, column, split, store_tokens, extra))

    def path(self, key: str) -> Path:
        """The entry folder of ``key``."""
        return self.root / f"{key}{ENTRY_SUFFIX}"

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
        shared: bool = False,
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
            shared: every process of torch.distributed's group makes this same call (a Lightning ``setup``): they
                agree whether the entry is there, and on a miss each encodes its own block of the distinct inputs
                into one entry (the cache folder must be one folder all of them see).

        Returns:
            (a :class:`~recipes.feature_store.StoredFeatures` over the N rows, memory-mapped: ``select(idx)`` cuts
            a batch, ``pooled`` [N, D], ``tokens`` [N, T, D] and ``mask`` [N, T] give whole-split tensors, T the
            longest row; CacheStats).
        """
        start = time.perf_counter()
        dataset = raw_view(dataset, column)
        parts = self.key_parts(encoder, dataset, column, split, store_tokens, extra)
        key = _digest(parts)
        out, source = (_MEMORY.get(key) if self.memory else None), "memory"
        if out is not None:
            _MEMORY.move_to_end(key)
        else:
            out, source = self._load(self.path(key), len(dataset)), "disk"
            if out is None and not store_tokens:  # an entry with tokens serves a pooled-only request too
                full = self._load(self.path(self.key(encoder, dataset, column, split, True, extra)), len(dataset))
                out = full.pooled_only() if full is not None else None
            if out is None:
                out = self._convert_legacy(parts, key)
            rank, world = process_group() if shared else (0, 1)
            if world > 1 and not all(_gathered(out is not None, world)):
                out = None  # some process does not see it: all encode together
            if out is None:
                args = (encoder, dataset, column, split, store_tokens, batch_size, transform, device, row_ids, key,
                        parts)
                out = self._compute_shared(*args, rank=rank, world=world) if world > 1 else self._compute(*args)
                source = "computed"
            self._remember(key, out)
        size = int(out.meta.get("bytes", 0)) if isinstance(out, StoredFeatures) else _nbytes(out)
        return out, CacheStats(key, source, out.batch_size, size, time.perf_counter() - start)  # type: ignore

    # storage -----------------------------------------------------------------------------------
    def _remember(self, key: str, out: ModalityOutput) -> None:
        if not self.memory:
            return
        _MEMORY[key] = out
        while len(_MEMORY) > 1 and sum(_nbytes(o) for o in _MEMORY.values()) > MEMORY_LIMIT_BYTES:
            _MEMORY.popitem(last=False)

    @staticmethod
    def _load(path: Path, rows: int) -> StoredFeatures | None:
        """The entry in ``path`` by memory map, or None (missing, or unusable: a one-line warning, encode again)."""
        if not path.is_dir():
            if path.exists():
                rank_zero_warn(f"feature cache entry {path} is not a folder; encoding again.")
            return None
        try:
            out = open_entry(path, rows)
        except CorruptEntry as e:
            rank_zero_warn(f"feature cache entry {path} is unreadable ({e}); encoding again.")
            return None
        if not out.finite:  # checked once, when written
            rank_zero_warn(f"feature cache entry {path} holds NaN/inf features (its encoder produced them); "
                           "encoding again.")
            return None
        return out

    def _commit(self, writer: StoreWriter, key: str) -> StoredFeatures:
        """Rename a finished temp folder into place and open it (:meth:`_commit_folder`)."""
        return self._commit_folder(writer.folder, key, int(writer.rows))

    def _commit_folder(self, folder: Path, key: str, rows: int) -> StoredFeatures:
        """Rename a finished temp folder into place and open it. An entry already there (unreadable, or written
        meanwhile by another process) is moved aside first; readers that mapped it keep their open files."""
        final = self.path(key)
        try:
            swap_folder(folder, final)
        except OSError:  # yet another writer put its whole entry there in between: use that one
            if not final.is_dir():
                raise
        return open_entry(final, rows)

    def _temp(self, key: str) -> Path:
        return self.root / temp_name(f"{key}{ENTRY_SUFFIX}")

    def _writer(self, key: str, dim: int, tokens: bool) -> StoreWriter:
        return StoreWriter(self._temp(key), dim, tokens)

    def _convert_legacy(self, parts: dict[str, Any], key: str) -> StoredFeatures | None:
        """A format-2 single-file entry of the same features, converted into an entry folder once (None if none)."""
        old = self.root / f"{_digest({**parts, 'format': LEGACY_FORMAT})}.safetensors"
        if not old.is_file():
            return None
        try:
            t = load_file(str(old))
            out = ModalityOutput(t["tokens"], t["mask"], t["pooled"]).validate(str(old))
        except (SafetensorError, KeyError, InputError, OSError) as e:
            rank_zero_warn(f"feature cache entry {old} (old format) is unreadable ({e}); encoding again.")
            return None
        rank_zero_info(f"feature cache: converting {old.name} from the old single-file format to a sharded entry "
                       f"({key[:12]}...{ENTRY_SUFFIX}) once; the old file can be deleted.")
        writer = self._writer(key, out.dim, bool(parts["tokens"]))
        try:
            step = 4096
            for i in range(0, out.batch_size, step):
                writer.add(out.index(slice(i, i + step)))
            writer.finish(torch.arange(out.batch_size), parts)
            stored = self._commit(writer, key)
        finally:
            shutil.rmtree(writer.folder, ignore_errors=True)
        return self._load(stored.folder, out.batch_size)

    # encoding ----------------------------------------------------------------------------------
    def _compute(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str, store_tokens: bool,
                 batch_size: int, transform: Callable[[Any], Any] | None, device: torch.device | str | None,
                 row_ids: Sequence[int] | None, key: str, parts: dict[str, Any]) -> StoredFeatures:
        """Encode each distinct non-missing cell once into a new entry; rows point at their cell's slot."""
        n = len(dataset)
        if n == 0:
            raise DataError("nothing to encode: the split has no rows.")
        column_only = dataset.select_columns([column])
        slot, distinct_rows = _distinct(column_only, column)
        ids = list(row_ids) if row_ids is not None else list(range(n))
        writer = self._writer(key, int(encoder.embed_dim), store_tokens)
        try:
            if distinct_rows:  # else every cell is missing: absent everywhere, nothing to encode
                todo = column_only if len(distinct_rows) == n else column_only.select(distinct_rows)
                self._encode(encoder, todo, column, split, store_tokens, batch_size, transform, device,
                             [ids[r] for r in distinct_rows], n, writer)
            if not writer.finite:
                rank_zero_warn(f"feature cache: {split}/{column} features hold NaN/inf values (the encoder produced "
                               "them); they are stored but not served, so a later run encodes them again.")
            writer.finish(torch.tensor(slot, dtype=torch.long), parts)  # [N]
            return self._commit(writer, key)
        except (OSError, SafetensorError) as e:
            if not _no_space(e):
                raise
            raise DataError(_disk_full_message(self.root, writer, len(distinct_rows), f"{split}/{column}")) from e
        finally:  # a failed write leaves no entry behind: the cache holds whole entries only
            shutil.rmtree(writer.folder, ignore_errors=True)

    def _compute_shared(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str,
                        store_tokens: bool, batch_size: int, transform: Callable[[Any], Any] | None,
                        device: torch.device | str | None, row_ids: Sequence[int] | None, key: str,
                        parts: dict[str, Any], *, rank: int, world: int) -> StoredFeatures:
        """:meth:`_compute` split over the processes of a group: process ``rank`` encodes the ``rank``-th block of
        the distinct cells (whole shards) into its own subfolder of one temp folder; process 0 moves the blocks
        into one entry and renames it into place; then every process opens it by memory map."""
        n = len(dataset)
        if n == 0:
            raise DataError("nothing to encode: the split has no rows.")
        column_only = dataset.select_columns([column])
        slot, distinct_rows = _distinct(column_only, column)  # the same in every process: the same rows
        dim, s = int(encoder.embed_dim), len(distinct_rows)
        # blocks of whole shards, as even as possible: R divides each process's share into equal shards
        share = max(1, math.ceil(s / world))
        r = math.ceil(share / math.ceil(share / fixed_shard_rows(dim, store_tokens)))
        block = math.ceil(share / r) * r
        lo, hi = min(s, rank * block), min(s, (rank + 1) * block)
        name = [self._temp(key).name]
        torch.distributed.broadcast_object_list(name, src=0)  # one temp folder, named by process 0
        folder = self.root / name[0]
        caught: Exception | None = None
        try:
            writer = StoreWriter(folder / f"part-{rank:03d}", dim, store_tokens, shard_rows=r, first_shard=lo // r)
            if hi > lo:
                ids = list(row_ids) if row_ids is not None else list(range(n))
                mine = distinct_rows[lo:hi]
                self._encode(encoder, column_only.select(mine), column, split, store_tokens, batch_size, transform,
                             device, [ids[i] for i in mine], n, writer)
            writer.close_shards()
        except Exception as e:  # every process must reach the gather below, or the others wait forever
            caught = e
        blocks = _gathered(([], True, f"{type(caught).__name__}: {caught}") if caught else
                           (writer.shards, writer.finite, ""), world)
        failed = [f"process {i}: {b[2]}" for i, b in enumerate(blocks) if b[2]]
        if not failed and rank == 0:
            try:
                merge_parts(folder, [(folder / f"part-{i:03d}", b[0], b[1]) for i, b in enumerate(blocks)],
                            torch.tensor(slot, dtype=torch.long), dim, store_tokens, r, parts)
                self._commit_folder(folder, key, n)
            except (OSError, ValueError) as e:
                failed = [f"process 0 while joining the blocks: {type(e).__name__}: {e}; is the cache folder "
                          f"{self.root} one folder that every process sees?"]
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        failed = _gathered(failed, world)[0] or failed
        if failed:
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            if caught is not None:
                raise caught
            raise DataError(f"feature cache: encoding {split}/{column} across {world} processes failed ("
                            f"{'; '.join(failed)}); fix that, or run once with one process to fill the cache.")
        if not all(b[1] for b in blocks):
            rank_zero_warn(f"feature cache: {split}/{column} features hold NaN/inf values (the encoder produced "
                           "them); they are stored but not served, so a later run encodes them again.")
        return open_entry(self.path(key), n)

    def _encode(self, encoder: Encoder, dataset: datasets.Dataset, column: str, split: str, store_tokens: bool,
                batch_size: int, transform: Callable[[Any], Any] | None, device: torch.device | str | None,
                row_ids: Sequence[int], total: int, writer: StoreWriter) -> None:
        """Encode every row of ``dataset`` (distinct cells) in batches, each handed to ``writer`` as it is made."""
        n = len(dataset)
        name = (getattr(encoder, "spec", None) or {}).get("name", type(encoder).__name__)
        home = next(encoder.parameters(), torch.empty(0)).device
        device = torch.device(device) if device is not None else home
        was_training = encoder.training
        encoder.to(device).eval()
        # a folded copy when the key says so (same features within 1e-4, ~3x faster on CPU); if folding fails its
        # own check the plain encoder runs, which gives those same features
        # (its graph, zoo.graph.GraphEncode, is built on the first batch: a miss runs many batches of one shape)
        runner = inference_copy(encoder, self.fold, graph=self.graph, graph_after=1)[0] \
            if self._inference_tag(encoder) != INFERENCE_TAG_PLAIN else encoder
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
                    # CPU image batches run in cache-sized chunks, folded or not (recipes.chunks.CHUNK_PIXELS)
                    out = run_in_chunks(runner, {k: v.to(device) for k, v in batch.items()}, device)
                    writer.add(out)
                done += size
                if done % step == 0 and done < n:
                    rank_zero_info(f"feature cache: {split}/{column} {done}/{n} rows")
        finally:
            encoder.to(home).train(was_training)

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
