"""Splits, labels and cell checks behind :class:`recipes.data.FusionDataModule` (docs/data.md); reading the data
is :mod:`recipes.formats`."""

from __future__ import annotations

import io
import math
import os
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile as sf
import torch
from PIL import Image

from fusion_errors import DataError

__all__ = ["choose_splits", "pick_splits", "infer_labels", "LabelEncoder", "is_missing", "visible", "resolve",
           "raw_cell", "cell_problem", "IMAGE_EXTS", "AUDIO_EXTS", "SPLIT_ALIASES"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
SPLIT_ALIASES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
                 "test": ("test", "testing", "eval")}


def choose_splits(available: Sequence[str], splits: Mapping[str, str] | None) -> dict[str, str]:
    """Role -> split name among ``available``: named by ``splits``, else found by usual names; train is the only
    split when there is one. Roles left out are carved from train by the caller."""
    chosen: dict[str, str] = {}
    for role, name in (splits or {}).items():
        if role not in SPLIT_ALIASES:
            raise DataError(f"splits key {role!r} is not one of {list(SPLIT_ALIASES)}.")
        if name not in available:
            raise DataError(f"split {name!r} (for {role}) is not in the data; available splits: {list(available)}. "
                            f"Map it with --data.splits '{{\"{role}\": \"<split>\"}}'.")
        chosen[role] = name
    for role, aliases in SPLIT_ALIASES.items():
        found = [a for a in aliases if a in available and a not in chosen.values()]
        if role not in chosen and found:
            chosen[role] = found[0]
    if "train" not in chosen:
        if len(available) != 1:
            raise DataError(f"no train split among {list(available)}; name it with "
                            "--data.splits '{\"train\": \"<split>\"}'.")
        chosen["train"] = available[0]
    return chosen


def pick_splits(dd: datasets.DatasetDict, splits: dict[str, str] | None, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, tuple[datasets.Dataset, str, np.ndarray]]:
    """train/validation/test, named by ``splits``, found by usual names, or carved from train at random (seeded).

    Returns:
        role -> (rows, the data's split they come from, their row numbers in that split).
    """
    chosen = choose_splits(list(dd), splits)
    out = {role: (dd[name], name, np.arange(len(dd[name]))) for role, name in chosen.items()}
    carve = [r for r in ("validation", "test") if r not in out]
    if carve:
        train, name, _ = out["train"]
        n = len(train)
        fractions = {"validation": val_fraction, "test": test_fraction}
        counts = {r: max(1, round(n * fractions[r])) for r in carve}
        if n - sum(counts.values()) < 1:
            raise DataError(f"train split has {n} rows: too few to carve {carve} from it with val_fraction="
                            f"{val_fraction}, test_fraction={test_fraction}; add rows or give those splits.")
        perm = np.random.default_rng(seed).permutation(n)
        at = 0
        for r in [*carve, "train"]:
            rows = np.sort(perm[at:at + counts[r]] if r in counts else perm[at:])
            out[r] = (train.select(rows), name, rows)
            at += counts.get(r, 0)
    return out


def _inner(feature: Any) -> Any:
    return getattr(feature, "feature", None)


def _values(ds: datasets.Dataset, column: str) -> tuple[set[Any], int, bool]:
    """(distinct non-empty label values, widest list cell, whether some cell is empty)."""
    values: set[Any] = set()
    width, empty = 0, False
    for v in ds[column]:
        if isinstance(v, (list, tuple)):
            values.update(x for x in v if x is not None)
            width = max(width, len(v))
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            empty = True
        else:
            values.add(v)
    return values, width, empty


def infer_labels(parts: Sequence[datasets.Dataset] | Mapping[str, datasets.Dataset], column: str) -> list[str]:
    """Label names: a ClassLabel's names, sorted unique values, or target names for float (regression) columns.

    ``parts`` by role (``{"train": ..., "validation": ..., "test": ...}``): a class seen only in validation/test
    is an error (a typo, or a class the model could never learn) unless ``--data.labels`` names it. Labels are
    stripped of surrounding whitespace ("cat " is "cat", with a warning when that merges spellings). A float
    column of whole numbers with empty cells is integer classes (pandas reads empty int cells as NaN), not a
    regression target.
    """
    roles = dict(parts) if isinstance(parts, Mapping) else {str(i): ds for i, ds in enumerate(parts)}
    first = roles.get("train", next(iter(roles.values())))
    feature = first.features[column]
    for f in (feature, _inner(feature)):
        if isinstance(f, datasets.ClassLabel):
            return list(f.names)
    seen = {role: _values(ds, column) for role, ds in roles.items()}
    values = set().union(*(v for v, _, _ in seen.values()))
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        whole = values and all(isinstance(v, (int, float)) and float(v).is_integer() for v in values)
        if not (whole and any(e for _, _, e in seen.values())):
            return [column]
    if isinstance(_inner(feature), datasets.Value) and _inner(feature).dtype.startswith("float"):
        return [f"{column}_{i}" for i in range(max(w for _, w, _ in seen.values()))]
    _warn_merged(values, column)
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        names = [_name(v) for v in sorted(values)]
    else:
        names = sorted({_name(v) for v in values})
    if "train" in seen:
        known = {_name(v) for v in seen["train"][0]}
        for role in ("validation", "test"):
            extra = sorted({_name(v) for v in seen.get(role, (set(),))[0]} - known)
            if extra:
                raise DataError(
                    f"label(s) {extra[:10]} of column {column!r} appear in the {role} split but never in train; fix "
                    f"the typo, or list every class with --data.labels (e.g. {names[:6]}) to keep them."
                )
    return names


def _warn_merged(values: set[Any], column: str) -> None:
    by_name: dict[str, set[str]] = {}
    for v in values:
        if isinstance(v, str):
            by_name.setdefault(_name(v), set()).add(v)
    merged = {k: sorted(v) for k, v in by_name.items() if len(v) > 1}
    if merged:
        warnings.warn(f"labels of column {column!r} differ only in surrounding whitespace and are merged: "
                      f"{dict(list(merged.items())[:5])}.", stacklevel=3)


def _name(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


class LabelEncoder:
    """Turns label cells into the batch's label tensor for ``task`` over ``labels``."""

    def __init__(self, labels: Sequence[str], task: str, feature: Any) -> None:
        self.labels, self.task = list(labels), task
        self.index = {name: i for i, name in enumerate(self.labels)}
        inner = feature if isinstance(feature, datasets.ClassLabel) else _inner(feature)
        self.names = list(inner.names) if isinstance(inner, datasets.ClassLabel) else None

    def _lookup(self, v: Any) -> int | None:
        if self.names is not None and isinstance(v, int) and 0 <= v < len(self.names):
            v = self.names[v]
        return self.index.get(_name(v))

    def encode(self, values: Sequence[Any]) -> tuple[torch.Tensor, dict[int, str]]:
        """Returns the labels ([N] long, or [N, C] float) and {row: problem} for unusable cells."""
        problems: dict[int, str] = {}
        c = len(self.labels)
        # filled in numpy (a torch item write per row is slow), handed over as a tensor without a copy
        out = np.zeros(len(values), np.int64) if self.task == "multiclass" else np.zeros((len(values), c), np.float32)
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                problems[i] = "the label is empty"
            elif self.task == "regression":
                vec = list(v) if isinstance(v, (list, tuple)) else [v]
                if len(vec) != c or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vec):
                    problems[i] = f"label {v!r} is not {c} finite number(s) for targets {self.labels}"
                else:
                    out[i] = vec
            elif self.task == "multilabel":
                idx = [self._lookup(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
                if None in idx:
                    problems[i] = f"label {v!r} holds a name outside the label set {self.labels}"
                else:
                    out[i, [j for j in idx if j is not None]] = 1.0
            else:
                j = None if isinstance(v, (list, tuple)) else self._lookup(v)
                if j is None:
                    problems[i] = f"label {v!r} is not in the label set {self.labels}"
                else:
                    out[i] = j
        return torch.from_numpy(out), problems


def is_missing(v: Any) -> bool:
    """None, NaN, an empty or blank string, empty bytes or an empty datasets dict: a missing modality."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    if isinstance(v, str):
        return not visible(v)
    if isinstance(v, bytes):
        return not v.strip()
    if isinstance(v, dict):
        return not v.get("bytes") and not v.get("path") and v.get("array") is None
    return False


_ASCII_INVISIBLE = "".join(map(chr, [*range(0x21), 0x7F]))  # ASCII whitespace and control characters


def visible(text: str) -> bool:
    """Whether ``text`` has a character that is not whitespace, a control character (NUL ...) or an invisible
    format character (zero-width space, BOM ...): text made only of those is empty, a missing modality."""
    if text.isascii():  # the same answer without a per-character lookup (row checks run this per cell)
        return bool(text.strip(_ASCII_INVISIBLE))
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def _plain(path: str) -> bool:
    """Whether pathlib would keep ``path`` as written (no ``~``, backslash, URL, ``.`` part or doubled slash)."""
    return not (path[:1] in ("~", ".") or "\\" in path or "//" in path or "/." in path or path.endswith("/"))


def resolve(v: Any, base: Path | None) -> Any:
    """A relative path (bare or in a ``{"bytes", "path"}`` dict without bytes) made absolute against ``base``; a
    Windows-style relative path (``images\\cat.png``) is read with forward slashes when only that file exists."""
    if base is None:
        return v
    if isinstance(v, str) and _plain(v) and str(base) != ".":  # the common case without pathlib (row checks
        return v if os.path.isabs(v) else os.path.join(str(base), v)  # run this per cell): the same string
    if isinstance(v, str) and not Path(v).expanduser().is_absolute() and "://" not in v:
        if "\\" in v and not (base / v).exists() and (base / v.replace("\\", "/")).exists():
            return str(base / v.replace("\\", "/"))  # a table written on Windows: images\cat.png
        return str(base / v)
    if isinstance(v, dict) and not v.get("bytes") and isinstance(v.get("path"), str) and v.get("array") is None:
        return {**v, "path": resolve(v["path"], base)}
    return v


def _source(v: Any) -> tuple[str | None, bytes | None]:
    if isinstance(v, str):
        return v, None
    if isinstance(v, (bytes, bytearray)):
        return None, bytes(v)
    if isinstance(v, dict) and v.get("array") is None:
        return v.get("path"), v.get("bytes")
    return None, None


def raw_cell(modality: str, v: Any, base: Path | None) -> Any:
    """A raw cell as the preprocessor takes it: None when missing, text as str, relative paths resolved."""
    if is_missing(v):
        return None
    return str(v) if modality == "text" else resolve(v, base)


def cell_problem(modality: str, v: Any) -> str | None:
    """Why a non-missing cell cannot be used (file absent, empty or not decodable), or None if it looks fine.

    Images are opened and verified, audio headers read; full decoding happens when the batch is built.
    """
    if modality == "text":
        return None if isinstance(v, (str, int, float)) else f"text cell is a {type(v).__name__}, not a string"
    path, data = _source(v)
    if path is None and data is None:
        return None  # arrays, PIL images, {"array", "sampling_rate"} dicts are checked when preprocessed
    if data is None:
        assert path is not None
        p = Path(path).expanduser()
        try:
            exists = p.is_file()
        except (OSError, ValueError):  # a name too long for a file, NUL bytes
            exists = False
        if not exists:
            exts = IMAGE_EXTS if modality == "image" else AUDIO_EXTS
            if p.suffix.lower() not in exts:  # 'hi', 'a nice day': words, not a file name
                return (f"{modality} cell {str(path)[-60:]!r} is not an existing {modality} file and has no "
                        f"{modality} extension ({', '.join(sorted(exts))}): is a text column given to the "
                        f"{modality} encoder? Map columns with --data.columns '{{\"text\": \"<column>\"}}'")
            return f"file {str(p)!r} does not exist"
        if p.stat().st_size == 0:
            return f"file {str(p)!r} is empty"
    try:
        if modality == "image":
            with Image.open(io.BytesIO(data) if data else str(path)) as img:
                img.verify()
        else:
            sf.info(io.BytesIO(data) if data else str(path))
    except Exception as e:  # PIL and libsndfile raise many types for unreadable content
        where = repr(str(path)) if path else "bytes"
        return f"{modality} {where} is not readable ({type(e).__name__}: {e})"
    return None
