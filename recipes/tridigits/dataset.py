"""The bundled ``tridigits`` dataset: one handwritten digit seen, heard and hinted at.

Each row holds a degraded 32x32 grayscale digit (``image``), the digit spoken by espeak-ng with background noise
(``audio``: 16 kHz mono FLAC bytes, decode with ``soundfile``), a text clue that narrows it to 2..5 digits
(``text``) and the digit itself (``label``). No modality alone is enough; together they are. The files ship in
``recipes/tridigits/data/`` and load offline; ``python -m recipes.tridigits.build`` rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets

from fusion_errors import DataError

from ..sources import register_source

__all__ = [
    "TRIDIGITS_LABELS", "FEATURES", "DATA_DIR", "SPLITS",
    "load_tridigits", "describe", "write_manifest",
]  # fmt: skip

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "validation", "test")
TRIDIGITS_LABELS = [str(d) for d in range(10)]
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `apt install espeak-ng` then `python -m recipes.tridigits.build`"
FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("int32"),
        "label": datasets.ClassLabel(names=TRIDIGITS_LABELS),
        "image": datasets.Image(),
        "audio": datasets.Value("binary"),
        "text": datasets.Value("string"),
        "clue_digits": datasets.Sequence(datasets.Value("int8")),
        "voice": datasets.Value("string"),
        "speed": datasets.Value("int16"),
        "pitch": datasets.Value("int16"),
    }
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(data_dir: Path = DATA_DIR, **extra: Any) -> dict[str, Any]:
    """Records the sha256 and byte size of every ``<split>.parquet`` in ``data_dir/manifest.json``."""
    files = {f"{s}.parquet": {"sha256": _sha256(data_dir / f"{s}.parquet"),
                              "bytes": (data_dir / f"{s}.parquet").stat().st_size} for s in SPLITS}  # fmt: skip
    manifest = {"name": "tridigits", "files": files, **extra}
    (data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _verified_files(data_dir: Path, splits: list[str]) -> dict[str, str]:
    """Checks each split file against the manifest → {split: path}; raises DataError on any mismatch."""
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"tridigits manifest {manifest_path} is missing; {REBUILD}")
    files = json.loads(manifest_path.read_text())["files"]
    out = {}
    for split in splits:
        name = f"{split}.parquet"
        path = data_dir / name
        if not path.is_file() or name not in files:
            raise DataError(f"tridigits file {path} is missing or not in {manifest_path}; {REBUILD}")
        if _sha256(path) != files[name]["sha256"]:
            raise DataError(f"tridigits file {path} does not match its sha256 in {manifest_path} "
                            f"(corrupted or edited); restore it from the repository or {REBUILD}")  # fmt: skip
        out[split] = str(path)
    return out


def load_tridigits(
    split: str | None = None, data_dir: str | Path | None = None
) -> datasets.DatasetDict | datasets.Dataset:
    """Loads the shipped parquet files offline, checksum-verified.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"`` for one ``Dataset``; ``None`` for a ``DatasetDict``.
        data_dir: folder holding the parquet files and ``manifest.json`` (default: the bundled copy).

    Returns:
        Rows with ``image`` (PIL on access), ``audio`` (FLAC bytes), ``text``, ``label`` (ClassLabel 0..9)
        and metadata ``sample_id``, ``clue_digits``, ``voice``, ``speed``, ``pitch``.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"tridigits has no split {split!r}; use one of {list(SPLITS)} or None for all")
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    files = _verified_files(data_dir, [split] if split else list(SPLITS))
    ds = datasets.load_dataset("parquet", data_files=files, features=FEATURES)
    return ds[split] if split else ds


@register_source("tridigits", "the bundled tri-modal demo: spoken, written and handwritten digits (10 classes)",
                 "made by fusion-zoo, shipped in the package (recipes/tridigits/data)")
def _tridigits_source() -> tuple[datasets.DatasetDict, Path | None]:
    splits = load_tridigits()
    assert isinstance(splits, datasets.DatasetDict)
    return splits, None


def describe(data_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Rows, per-label counts and voices of every split: ``{split: {"rows", "labels", "voices"}}``."""
    ds = load_tridigits(data_dir=data_dir)
    out = {}
    for split in SPLITS:
        labels = ds[split]["label"]
        out[split] = {
            "rows": len(labels),
            "labels": {TRIDIGITS_LABELS[c]: labels.count(c) for c in range(10)},
            "voices": sorted(set(ds[split]["voice"])),
        }
    return out
