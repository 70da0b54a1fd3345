"""Folders: one table per split (``tablefolder``), or image / audio files in class sub-folders.

An ``imagefolder``/``audiofolder`` is read as Hugging Face's are: the label is the class sub-folder's name, split
sub-folders (train/validation/test and their usual aliases) are optional. A media folder that also holds a
metadata table is read through that table, which names the files and their labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from fusion_errors import DataError

from .._columns import AUDIO_EXTS, IMAGE_EXTS, SPLIT_ALIASES
from . import Source, Splits, get_format, pick_format, read, register_format, split_tables


def _has_tables(source: Source) -> bool:
    return source.folder is not None and bool(split_tables(source.folder))


def _holds(exts: set[str]) -> Callable[[Source], bool]:
    def sniff(source: Source) -> bool:
        root = source.folder
        return root is not None and root.is_dir() and any(p.suffix.lower() in exts for p in root.rglob("*"))
    return sniff


@register_format("tablefolder", reads="folder", sniff=_has_tables, rank=0, streams=True)
def read_tablefolder(source: Source) -> Splits:
    """A folder of ``train.csv``/``validation.csv``/``test.csv`` (any table format), or ``metadata.*`` as train."""
    assert source.folder is not None
    tables = split_tables(source.folder)
    if not tables:
        raise DataError(f"{source.folder} holds no table (train.csv, validation.csv, test.csv or metadata.csv, any "
                        "registered table format); point --data.data_dir at your data folder.")
    groups: dict[str, dict[str, list[str]]] = {}  # format -> its splits (train.csv beside test.jsonl: two reads)
    for split, path in tables.items():
        one = Source(files={split: [path]}, folder=source.folder)
        groups.setdefault(pick_format(one).name, {})[split] = [path]
    out: dict[str, Any] = {}
    for name, files in groups.items():
        out.update(read(get_format(name), Source(files=files, folder=source.folder, streaming=source.streaming)))
    if all(isinstance(v, datasets.Dataset) for v in out.values()):
        return datasets.DatasetDict({split: out[split] for split in tables})
    return datasets.IterableDatasetDict({split: _iterable(out[split]) for split in tables})


def _iterable(split: datasets.Dataset | datasets.IterableDataset) -> datasets.IterableDataset:
    return split.to_iterable_dataset() if isinstance(split, datasets.Dataset) else split


@register_format("audiofolder", reads="folder", sniff=_holds(AUDIO_EXTS), rank=10)
def read_audiofolder(source: Source) -> Splits:
    """Audio files in class sub-folders (label = folder name), split sub-folders optional."""
    return _read_media(source, "audio", AUDIO_EXTS)


@register_format("imagefolder", reads="folder", sniff=_holds(IMAGE_EXTS), rank=20)
def read_imagefolder(source: Source) -> Splits:
    """Image files in class sub-folders (label = folder name), split sub-folders optional."""
    return _read_media(source, "image", IMAGE_EXTS)


def _read_media(source: Source, column: str, exts: set[str]) -> Splits:
    """Rows ``{column: path, label: class folder}`` per split; a folder with a metadata table reads that table."""
    root = source.folder
    assert root is not None
    if _has_tables(source):
        return read_tablefolder(source)
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    split_dirs = {s: subdirs[a] for s, aliases in SPLIT_ALIASES.items() for a in aliases if a in subdirs}
    out = {}
    for split, folder in (split_dirs or {"train": root}).items():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
        if not files:
            raise DataError(f"no {column} files ({', '.join(sorted(exts))}) under {folder}; check --data.data_dir.")
        labels = [p.parent.relative_to(folder).parts[0] if p.parent != folder else None for p in files]
        rows: dict[str, list[Any]] = {column: [str(p) for p in files]}
        if any(x is not None for x in labels):
            rows["label"] = labels
        out[split] = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict(out)

