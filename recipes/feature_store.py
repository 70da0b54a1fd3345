"""The on-disk layout of one feature-cache entry: row shards written while encoding, read back by memory map.

An entry is a folder ``<key>.features/`` (docs/data.md):

- ``meta.json``: rows N, distinct rows S, width D, whether tokens are stored, rows per shard R, each shard's row
  and token counts, the finiteness of every stored value (checked once, while writing) and the key's parts;
- ``rows.npy``: [N] int64, each row's distinct slot (identical cells share one), -1 where the cell is missing;
- per shard ``k`` (slots ``k*R .. k*R+R-1``): ``shard-k.pooled.npy`` [r, D] float32 and ``shard-k.present.npy``
  [r] bool; an entry with tokens adds ``shard-k.lengths.npy`` [r] int64 and the rows' tokens unpadded,
  ``shard-k.tokens.npy`` [t, D] float32 and ``shard-k.mask.npy`` [t] bool (each row's tokens up to its last valid
  one, rows one after another).

Pooled vectors are stored once: a pooled-only entry's tokens are views ``pooled[:, None]``. Token rows are padded
per batch (:meth:`StoredFeatures.select`), to the longest row of that batch, never over the whole split.
Everything is plain ``.npy`` (no pickle). A batch's rows are read with ``pread`` into a new buffer (consecutive
rows in one call), through the OS page cache but never mapped into the process: touching random rows of a memory
map maps whole folios around each (the kernel's fault-around and large page-cache folios), so a shuffled epoch
left the whole entry resident, and read batches slower. The files are also opened with ``mmap_mode='c'`` for
whole-split views (``pooled`` of a one-shard entry), where a stray in-place write stays private to the process.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from encoders import ModalityOutput
from fusion_common.atomic import atomic_write

__all__ = ["StoredFeatures", "StoreWriter", "CorruptEntry", "open_entry", "merge_parts", "fixed_shard_rows",
           "STORE_FORMAT", "SHARD_BYTES"]

STORE_FORMAT = 3
SHARD_BYTES = 64 << 20  # about this many feature bytes per shard: what encoding holds in memory at once
MAX_SHARD_ROWS = 1 << 16
META = "meta.json"


class CorruptEntry(ValueError):
    """An entry whose files are missing or disagree with its ``meta.json`` (it is encoded again)."""


def _save(path: Path, array: np.ndarray) -> None:
    """``np.save`` and flush to disk (the entry appears by one rename of its folder, after every file is whole)."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def fixed_shard_rows(dim: int, tokens: bool) -> int:
    """R known before any batch (processes that write parts of one entry must agree on it): pooled rows fill
    :data:`SHARD_BYTES`; a row with tokens is counted as 16 tokens."""
    return int(min(MAX_SHARD_ROWS, max(256, SHARD_BYTES // (4 * dim * (17 if tokens else 1)))))


def _save_pieces(path: Path, pieces: list[np.ndarray], count: int) -> np.ndarray:
    """Save the first ``count`` rows of ``pieces`` (arrays of one dtype and row shape, in order) as one ``.npy``,
    each piece written as it is; returns the rows after them (a copy, so the pieces can be freed)."""
    first = pieces[0]
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (count, *first.shape[1:])}
    left, rest = count, []
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for piece in pieces:
            head, tail = piece[:left], piece[left:]
            if head.size:
                f.write(np.ascontiguousarray(head).data)
            left -= head.shape[0]
            if tail.shape[0]:
                rest.append(tail)
        f.flush()
        os.fsync(f.fileno())
    return np.concatenate(rest) if rest else first[:0].copy()


class StoreWriter:
    """Writes one entry's distinct rows into ``folder`` shard by shard, as batches arrive from the encoder.

    At most one shard of rows is held in memory. :meth:`finish` writes ``rows.npy`` and ``meta.json``; the cache
    then renames ``folder`` into place, so readers see the whole entry or none.

    Args:
        folder: a new folder (the cache's temp folder).
        dim: D, the feature width.
        tokens: store per-token features (False: pooled vectors only).
        shard_rows: R, rows per shard (default: from the first batch's size per row).
        first_shard: number of this writer's first shard (a process writing one block of a shared entry).
    """

    def __init__(self, folder: Path, dim: int, tokens: bool, shard_rows: int = 0, first_shard: int = 0) -> None:
        self.folder, self.dim, self.tokens = Path(folder), int(dim), bool(tokens)
        self.folder.mkdir(parents=True, exist_ok=False)
        self.shard_rows = int(shard_rows)  # R, else fixed from the first batch's size per row
        self.first_shard = int(first_shard)
        self.shards: list[dict[str, int]] = []
        self.finite = True
        self.rows = 0  # N, set by finish
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, out: ModalityOutput) -> None:
        """Append a batch of distinct rows (tokens [B, T, D], mask [B, T], pooled [B, D])."""
        pooled = out.pooled.detach().float().cpu()  # [B, D]
        part: dict[str, np.ndarray] = {"pooled": pooled.numpy(), "present": out.present.cpu().numpy()}
        self.finite &= bool(torch.isfinite(pooled).all())
        row_bytes = 4 * self.dim
        if self.tokens:
            mask = out.mask.cpu()  # [B, T]
            t = mask.shape[1]
            last = torch.where(mask.any(1), t - mask.flip(1).int().argmax(1), 0)  # [B] valid prefix length
            keep = torch.arange(t)[None] < last[:, None]  # [B, T]
            tokens = out.tokens.detach().float().cpu()[keep]  # [sum L, D]
            self.finite &= bool(torch.isfinite(tokens).all())
            part |= {"tokens": tokens.numpy(), "mask": mask[keep].numpy(), "lengths": last.long().numpy()}
            row_bytes += 4 * self.dim * t
        if not self.shard_rows:
            self.shard_rows = int(min(MAX_SHARD_ROWS, max(256, SHARD_BYTES // row_bytes)))
        self._pending.append(part)
        self._pending_rows += pooled.shape[0]
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as the next shard, piece by piece (no joined copy of the shard);
        keep the rest pending."""
        lengths = np.concatenate([p["lengths"] for p in self._pending]) if self.tokens else None  # [pending rows]
        counts = {k: rows for k in self._pending[0]}
        if lengths is not None:
            t = int(lengths[:rows].sum())
            counts["tokens"] = counts["mask"] = t
        k = self.first_shard + len(self.shards)
        rest: dict[str, np.ndarray] = {}
        for name, count in counts.items():
            rest[name] = _save_pieces(self.folder / f"shard-{k:05d}.{name}.npy", [p[name] for p in self._pending],
                                      count)
        self.shards.append({"rows": int(rows), "tokens": counts.get("tokens", 0)})
        self._pending_rows -= rows
        self._pending = [rest] if self._pending_rows else []

    def close_shards(self) -> None:
        """Write the rows still pending as the last (possibly short) shard."""
        if self._pending_rows:
            self._flush(self._pending_rows)

    def finish(self, slots: Tensor, key_parts: dict[str, Any]) -> None:
        """Write the last shard, ``rows.npy`` (slots [N] int64, -1 = missing) and ``meta.json``."""
        self.close_shards()
        self.rows = int(slots.numel())
        _write_index(self.folder, slots, self.dim, self.tokens, self.shard_rows or MAX_SHARD_ROWS, self.shards,
                     self.finite, key_parts)


def _write_index(folder: Path, slots: Tensor, dim: int, tokens: bool, shard_rows: int, shards: list[dict[str, int]],
                 finite: bool, key_parts: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """``rows.npy`` and ``meta.json`` of an entry whose shard files are all in ``folder``."""
    _save(folder / "rows.npy", slots.to(torch.int64).numpy())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    meta = {"format": STORE_FORMAT, "rows": int(slots.numel()), "distinct": sum(s["rows"] for s in shards),
            "dim": dim, "tokens": tokens, "shard_rows": shard_rows, "shards": shards, "finite": finite,
            "bytes": size, "key_parts": key_parts, **(extra or {})}
    with atomic_write(folder / META) as tmp:
        tmp.write_text(json.dumps(meta, sort_keys=True, default=str))


def merge_parts(folder: Path, parts: list[tuple[Path, list[dict[str, int]], bool]], slots: Tensor, dim: int,
                tokens: bool, shard_rows: int, key_parts: dict[str, Any]) -> None:
    """Make ``folder`` one entry from blocks written by several processes: ``parts`` are (subfolder, its shards,
    finite) in shard order, each subfolder's files already numbered by their place in the whole entry; only the
    entry's last shard may be short. ``meta.json`` records how many distinct rows each block encoded."""
    shards = [x for _, block, _ in parts for x in block]
    if any(int(x["rows"]) != shard_rows for x in shards[:-1]):
        raise ValueError(f"only the last shard may be short: {[x['rows'] for x in shards]} in shards of {shard_rows}")
    for sub, _, _ in parts:
        for f in sorted(sub.iterdir()):
            os.replace(f, folder / f.name)
        sub.rmdir()
    encoded = [sum(int(x["rows"]) for x in block) for _, block, _ in parts]
    _write_index(folder, slots, dim, tokens, shard_rows, shards, all(f for _, _, f in parts), key_parts,
                 {"encoded_by_process": encoded})


def _load(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Open one ``.npy`` by memory map after checking its header against the shape and dtype ``meta.json`` gives."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False) if np.prod(shape) else \
            np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"{path.name}: {e}") from e
    if array.shape != shape or array.dtype != dtype:
        raise CorruptEntry(f"{path.name} holds {array.dtype}{list(array.shape)}, meta.json says {dtype}{list(shape)}")
    return array


class _RowReader:
    """Rows of one ``.npy`` file [r, ...] read by ``pread`` into fresh arrays (the file is never mapped for this).

    The descriptor opens on first use and again in a forked process (a DataLoader worker).
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # the map (whole-split views), or an in-memory array for an empty file
        self.path = getattr(array, "filename", None)
        self.offset = int(getattr(array, "offset", 0))
        self.row_shape, self.dtype = tuple(array.shape[1:]), array.dtype
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * array.dtype.itemsize
        self._fd: int | None = None
        self._pid = 0

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` [B] (in that order, repeats allowed) as a new array [B, ...]."""
        out = np.empty((rows.size, *self.row_shape), self.dtype)
        if rows.size == 0 or self.path is None or not self.row_bytes or not hasattr(os, "pread"):
            return np.array(self.array[rows]) if rows.size else out  # no pread (Windows): through the map
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), os.getpid()
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]  # [B] sorted: consecutive rows are read by one call
        cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [ordered.size]])
        buf = np.empty_like(out)
        view = buf.data.cast("B")  # buf is C-contiguous: its bytes in order
        rb = self.row_bytes
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            want = (b - a) * rb
            got = _pread_into(self._fd, view[a * rb:b * rb], self.offset + int(ordered[a]) * rb)
            if got != want:
                raise CorruptEntry(f"{Path(self.path).name}: read {got} of {want} bytes (the file is shorter than "
                                   "its header says); delete the entry folder to encode it again")
        out[order] = buf
        return out


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv (macOS before 11, Windows): a copy through bytes
            data = os.pread(fd, len(view) - done, offset + done)
            n = len(data)
            view[done:done + n] = data
        if n <= 0:
            break
        done += n
    return done


def open_entry(folder: Path, rows: int) -> StoredFeatures:
    """Open the entry in ``folder`` by memory map; raise :class:`CorruptEntry` if its files disagree with its
    ``meta.json`` or with ``rows`` (N). Cheap: only headers, ``rows.npy`` and the [S] per-row counts are read."""
    try:
        meta = json.loads((folder / META).read_text())
        n, s, d, r = int(meta["rows"]), int(meta["distinct"]), int(meta["dim"]), int(meta["shard_rows"])
        tokens, shards = bool(meta["tokens"]), list(meta["shards"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"{META}: {e}") from e
    if meta.get("format") != STORE_FORMAT:
        raise CorruptEntry(f"format {meta.get('format')}, this version reads {STORE_FORMAT}")
    if n != rows:
        raise CorruptEntry(f"{n} rows, expected {rows}")
    if sum(int(x["rows"]) for x in shards) != s or any(int(x["rows"]) != r for x in shards[:-1]):
        raise CorruptEntry(f"shard row counts {[x['rows'] for x in shards]} do not add up to {s} in shards of {r}")
    slots = torch.from_numpy(np.array(_load(folder / "rows.npy", (n,), np.dtype(np.int64))))  # [N]
    if n and (int(slots.min()) < -1 or int(slots.max()) >= s):
        raise CorruptEntry(f"rows.npy points outside the {s} stored rows")
    parts: dict[str, list[np.ndarray]] = {"pooled": [], "present": [], "lengths": [], "tokens": [], "mask": []}
    f32 = np.dtype(np.float32)
    for k, shard in enumerate(shards):
        sr, st, name = int(shard["rows"]), int(shard["tokens"]), f"shard-{k:05d}"
        parts["pooled"].append(_load(folder / f"{name}.pooled.npy", (sr, d), f32))
        parts["present"].append(np.array(_load(folder / f"{name}.present.npy", (sr,), np.dtype(bool))))
        if tokens:
            lengths = np.array(_load(folder / f"{name}.lengths.npy", (sr,), np.dtype(np.int64)))
            if int(lengths.sum()) != st or (sr and int(lengths.min()) < 0):
                raise CorruptEntry(f"{name}.lengths.npy adds up to {int(lengths.sum())} tokens, meta.json says {st}")
            parts["lengths"].append(lengths)
            parts["tokens"].append(_load(folder / f"{name}.tokens.npy", (st, d), f32))
            parts["mask"].append(_load(folder / f"{name}.mask.npy", (st,), np.dtype(bool)))
    return StoredFeatures(folder, meta, slots, parts)


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array) if array.size else torch.from_numpy(np.array(array))


class StoredFeatures(ModalityOutput):
    """All N rows of one entry as a :class:`ModalityOutput` whose big arrays stay on disk, memory-mapped.

    :meth:`select` cuts a batch (what training uses: only that batch's pages are read); ``pooled``, ``tokens`` and
    ``mask`` give whole-split tensors for code that wants them: a pooled-only entry's are views of the map, an
    entry with tokens pads its rows to the longest one on first use and keeps the result.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], slots: Tensor,
                 parts: dict[str, list[np.ndarray]], with_tokens: bool | None = None) -> None:
        self.folder, self.meta, self._parts = Path(folder), meta, parts
        self.shard_rows, self._dim = int(meta["shard_rows"]), int(meta["dim"])
        self.has_tokens = bool(meta["tokens"]) if with_tokens is None else with_tokens
        self.slots = slots  # [N] int64, -1 = missing
        self._pooled = [_tensor(a) for a in parts["pooled"]]  # [r, D] each, memory-mapped (whole-split views)
        self._readers = {k: [_RowReader(a) for a in parts[k]] for k in ("pooled", "tokens", "mask")}
        present = torch.from_numpy(np.concatenate(parts["present"])) if parts["present"] else \
            torch.zeros(0, dtype=torch.bool)  # [S]
        self._present = (slots >= 0) & present[slots.clamp_min(0)] if present.numel() else slots >= 0  # [N]
        if self.has_tokens:
            self._tokens = [_tensor(a) for a in parts["tokens"]]  # [t, D] each, memory-mapped
            self._masks = [_tensor(a) for a in parts["mask"]]  # [t] each
            self._lengths = torch.from_numpy(np.concatenate(parts["lengths"])) if parts["lengths"] else \
                torch.zeros(0, dtype=torch.long)  # [S]
            starts = [torch.cumsum(torch.from_numpy(x), 0) - torch.from_numpy(x) for x in parts["lengths"]]
            self._offsets = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)  # [S] in its shard
        n = int(slots.numel())
        # rows and stored slots coincide (one shard, no duplicates or gaps): ``pooled`` is the map itself
        self._identity = len(self._pooled) == 1 and self._pooled[0].shape[0] == n and \
            torch.equal(slots, torch.arange(n))
        self._full: tuple[Tensor, Tensor] | None = None

    # the ModalityOutput fields, over all N rows ----------------------------------------------------------------
    @property  # type: ignore[override]
    def pooled(self) -> Tensor:
        """[N, D]: a view of the map when rows and stored slots coincide (one shard, no duplicates or gaps)."""
        if self._identity:
            return self._pooled[0]
        return self._rows(self.slots.clamp_min(0), self.slots < 0)

    @pooled.setter
    def pooled(self, value: Tensor) -> None:
        raise AttributeError("StoredFeatures are read-only; build a ModalityOutput for new features.")

    @property  # type: ignore[override]
    def tokens(self) -> Tensor:
        """[N, T, D], T the longest row: a view ``pooled[:, None]`` for a pooled-only entry."""
        return self._whole()[0]

    @tokens.setter
    def tokens(self, value: Tensor) -> None:
        raise AttributeError("StoredFeatures are read-only; build a ModalityOutput for new features.")

    @property  # type: ignore[override]
    def mask(self) -> Tensor:
        """[N, T] bool."""
        return self._whole()[1]

    @mask.setter
    def mask(self, value: Tensor) -> None:
        raise AttributeError("StoredFeatures are read-only; build a ModalityOutput for new features.")

    @property
    def present(self) -> Tensor:
        """[N] bool, held in memory."""
        return self._present

    @property
    def batch_size(self) -> int:
        return int(self.slots.numel())

    @property
    def dim(self) -> int:
        return self._dim

    def _whole(self) -> tuple[Tensor, Tensor]:
        if not self.has_tokens:
            pooled = self.pooled
            return pooled[:, None], self._present[:, None]  # [N, 1, D], [N, 1] views
        if self._full is None:
            out = self.select(torch.arange(self.batch_size))
            self._full = (out.tokens, out.mask)
        return self._full

    def __repr__(self) -> str:
        kind = "tokens" if self.has_tokens else "pooled"
        return f"StoredFeatures({self.folder.name}, rows={self.batch_size}, dim={self.dim}, {kind})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a DataLoader worker) by its folder: the worker maps the same files instead of a copy."""
        return _reopen, (str(self.folder), self.batch_size, self.has_tokens)

    # batches ------------------------------------------------------------------------------------------------
    def select(self, idx: Tensor, tokens: bool = True) -> ModalityOutput:
        """Rows ``idx`` [B] as a new in-memory batch; tokens padded to the longest of these rows (at least 1).

        With ``tokens`` False (or a pooled-only entry) each row's pooled vector is its one token.
        """
        idx = torch.as_tensor(idx, dtype=torch.long)
        slot = self.slots.index_select(0, idx)  # [B]
        missing = slot < 0  # [B]
        safe = slot.clamp_min(0)
        pooled = self._rows(safe, missing)  # [B, D]
        present = self._present.index_select(0, idx)  # [B]
        if not (tokens and self.has_tokens):
            return ModalityOutput(pooled[:, None], present[:, None], pooled)
        lengths = self._lengths.index_select(0, safe).masked_fill(missing, 0) if self._lengths.numel() else \
            torch.zeros_like(slot)  # [B]
        b, t, total = slot.numel(), max(1, int(lengths.max()) if lengths.numel() else 1), int(lengths.sum())
        out_tokens = torch.zeros(b, t, self._dim)  # [B, T, D]
        out_mask = torch.zeros(b, t, dtype=torch.bool)  # [B, T]
        if total:
            row = torch.repeat_interleave(torch.arange(b), lengths)  # [total]
            pos = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
            src = torch.repeat_interleave(safe, lengths)  # [total] distinct slot of each token
            flat = self._offsets.index_select(0, src) + pos  # [total] position in its shard's token file
            shard = src // self.shard_rows
            out_tokens[row, pos] = self._gather("tokens", shard, flat)
            out_mask[row, pos] = self._gather("mask", shard, flat)
        return ModalityOutput(out_tokens, out_mask, pooled)

    def index(self, idx: Tensor | slice) -> ModalityOutput:
        """Rows ``idx`` (a slice or [B] indices) as an in-memory batch."""
        if isinstance(idx, slice):
            idx = torch.arange(self.batch_size)[idx]
        return self.select(idx)

    def _rows(self, safe: Tensor, missing: Tensor) -> Tensor:
        """Pooled rows of slots ``safe`` [B]; zeros where ``missing`` [B]."""
        if not self._readers["pooled"]:
            return torch.zeros(safe.numel(), self._dim)
        out = self._gather("pooled", safe // self.shard_rows, safe % self.shard_rows)  # [B, D]
        return out.masked_fill_(missing[:, None], 0.0) if bool(missing.any()) else out

    def _gather(self, part: str, shard: Tensor, local: Tensor) -> Tensor:
        """Row ``local[i]`` of shard ``shard[i]``'s ``part`` file for every i, read by ``pread`` (one call per run
        of consecutive rows), so a batch costs no mapped pages."""
        readers = self._readers[part]
        rows = local.numpy()
        if len(readers) == 1:
            return torch.from_numpy(readers[0].read(rows))
        first = readers[0]
        out = np.empty((rows.size, *first.row_shape), first.dtype)
        shards = shard.numpy()
        for k in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == k)
            out[sel] = readers[k].read(rows[sel])
        return torch.from_numpy(out)

    def release(self) -> None:
        """Drop the pages this process mapped through whole-split views from its resident set (the files stay in
        the OS page cache; batches never map pages)."""
        for array in self._maps():
            handle = getattr(array, "_mmap", None)
            if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                try:
                    handle.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    continue

    def _maps(self) -> Iterator[np.ndarray]:
        yield from self._parts["pooled"]
        if self.has_tokens:
            yield from self._parts["tokens"]
            yield from self._parts["mask"]

    def pooled_only(self) -> StoredFeatures:
        """The same entry serving pooled vectors only (a pooled request answered by an entry with tokens)."""
        return StoredFeatures(self.folder, self.meta, self.slots, self._parts, with_tokens=False)

    @property
    def resident_bytes(self) -> int:
        """Bytes this object holds in RAM (the maps cost only the pages in use): per-row slots, counts and flags,
        plus whole-split tokens once something asked for them."""
        held = [self.slots, self._present] + ([self._lengths, self._offsets] if self.has_tokens else [])
        held += list(self._full or ())
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def finite(self) -> bool:
        """Whether every stored value was finite when written (checked once, at write time)."""
        return bool(self.meta.get("finite", False))


def _reopen(folder: str, rows: int, tokens: bool) -> StoredFeatures:
    stored = open_entry(Path(folder), rows)
    return stored if tokens or not stored.has_tokens else stored.pooled_only()
