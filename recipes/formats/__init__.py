"""Data formats: one registered function per way data arrives, and :func:`load_source`, which picks one.

A format is a function ``load(source) -> datasets.DatasetDict`` registered with :func:`register_format` and the
files it claims: table suffixes (``.csv``), or a sniff of a folder. The built-in ones are CSV/TSV, JSON/JSONL and
Parquet (``tables.py``), a folder of per-split tables and image/audio folders (``folders.py``) and a Hugging Face
hub dataset (``hub.py``). Every module here not starting with ``_`` is imported on first lookup, so a new format is
one function in a new file, and ``--data.data_format NAME`` accepts it (docs/data.md, "Adding a data source").

:func:`load_source` is what ``fit``, ``test``, ``sweep``, ``predict --table`` and ``zoo verify`` read through: a
named dataset (``recipes/sources.py``: tridigits, easyvqa) first, else local files or a folder, else a hub name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import datasets

from fusion_common import Registry
from fusion_errors import DataError, RegistryError

from ..sources import get_source

__all__ = ["DataFormat", "Source", "register_format", "get_format", "list_formats", "split_tables", "locate",
           "pick_format", "read", "load_source", "load_stream"]

Reads = Literal["files", "folder", "name"]
#: split names a folder of per-split tables may use, in the order they are looked for
TABLE_SPLITS = ("train", "validation", "valid", "val", "dev", "test")


@dataclasses.dataclass(frozen=True)
class Source:
    """What the user pointed at, resolved: a format reads the part it is registered for.

    Attributes:
        files: split -> file paths (``--data.data_files``, or a ``--data.dataset`` that is a file); relative paths
            are already resolved against ``folder``.
        folder: ``--data.data_dir`` (or a ``--data.dataset`` that is a folder), absolute.
        name: ``--data.dataset`` when it is not a registered named source.
        streaming: read the splits as iterables (``--data.streaming``); a format registered with ``streams=True``
            returns an ``IterableDatasetDict`` then, the others are converted after reading.
    """

    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    folder: Path | None = None
    name: str | None = None
    streaming: bool = False

    @property
    def first(self) -> str:
        """The first file (its suffix picks the format; errors name it)."""
        return next(f for paths in self.files.values() for f in paths)

    @property
    def base(self) -> Path | None:
        """The folder relative paths in cells are resolved against: ``folder``, else the first file's folder."""
        if self.folder is not None:
            return self.folder
        return Path(self.first).resolve().parent if self.files else None


#: what a format's loader returns: the splits (an IterableDatasetDict from a ``streams`` format asked to stream)
Splits: TypeAlias = datasets.DatasetDict | datasets.IterableDatasetDict
Loader = Callable[[Source], Splits]


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """A registered format: its loader and what it claims.

    Attributes:
        reads: ``files`` (claims files by ``suffixes``), ``folder`` (claims a folder ``sniff`` accepts) or ``name``
            (a dataset name, claimed when nothing local matches).
        rank: lower is asked first when a folder or name could be read by several formats.
        streams: the loader honours ``Source.streaming`` (reads the splits lazily instead of converting them).
    """

    name: str
    load: Loader
    reads: Reads
    suffixes: tuple[str, ...]
    sniff: Callable[[Source], bool] | None
    rank: int
    description: str
    streams: bool = False

    def claims(self, source: Source) -> bool:
        """Whether this format reads ``source`` when no ``--data.data_format`` is given."""
        if self.reads == "files":
            return bool(source.files) and Path(source.first).suffix.lower() in self.suffixes
        if self.reads == "folder" and (source.files or source.folder is None):
            return False
        return self.sniff is not None and self.sniff(source)


_REGISTRY: Registry[Splits] = Registry("data format", package=__name__)
_FORMATS: dict[str, DataFormat] = {}


def register_format(name: str, *, reads: Reads = "files", suffixes: Sequence[str] = (),
                    sniff: Callable[[Source], bool] | None = None, rank: int = 100,
                    description: str = "", streams: bool = False) -> Callable[[Loader], Loader]:
    """Decorator: register ``load(source) -> DatasetDict`` as ``--data.data_format name``.

    Args:
        reads: what the loader reads from the :class:`Source` (``files``, ``folder`` or ``name``).
        suffixes: file suffixes it claims (``".csv"``); they also find ``train<suffix>`` tables in a folder.
        sniff: for ``folder``/``name`` formats, whether it claims a source given without a format.
        rank: order among formats that claim the same source (lower first).
        streams: ``load`` returns an ``IterableDatasetDict`` when ``source.streaming`` is set (else the splits
            are read whole and converted with ``Dataset.to_iterable_dataset`` under ``--data.streaming``).
    """
    if reads not in ("files", "folder", "name"):
        raise RegistryError(f"data format {name!r}: reads={reads!r} must be 'files', 'folder' or 'name'.")
    if reads == "files" and not suffixes:
        raise RegistryError(f"data format {name!r} reads files: give the suffixes it claims, e.g. suffixes=('.csv',).")

    def wrap(load: Loader) -> Loader:
        _REGISTRY.register(name)(load)  # a duplicate name raises
        _FORMATS[name] = DataFormat(name, load, reads, tuple(s.lower() for s in suffixes), sniff, rank,
                                    description or (load.__doc__ or "").strip().split("\n")[0], streams)
        return load

    return wrap


def get_format(name: str) -> DataFormat:
    """The format registered as ``name``; a DataError naming the registered ones otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list_formats(), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise DataError(f"--data.data_format {name!r} is not a registered format{hint}; use one of "
                        f"{', '.join(list_formats())}, or register yours with recipes.formats.register_format.")
    return _FORMATS[name]


def list_formats(pattern: str | None = None) -> list[str]:
    """Registered format names, optionally filtered by a shell pattern."""
    return _REGISTRY.list(pattern)


def _ranked() -> list[DataFormat]:
    return sorted((_FORMATS[n] for n in list_formats()), key=lambda f: (f.rank, f.name))


def split_tables(root: Path) -> dict[str, str]:
    """``{split}{suffix}`` tables in ``root`` for every registered table suffix, else ``metadata{suffix}`` as the
    train split; {} when there are none."""
    suffixes = [s for f in _ranked() if f.reads == "files" for s in f.suffixes]
    tables: dict[str, str] = {}
    for split in TABLE_SPLITS:
        for ext in suffixes:
            if (root / f"{split}{ext}").is_file():
                tables.setdefault(split, str(root / f"{split}{ext}"))
    for ext in suffixes:
        if not tables and (root / f"metadata{ext}").is_file():
            tables["train"] = str(root / f"metadata{ext}")
    return tables


def _as_path(p: str | Path, folder: Path | None) -> str:
    path = Path(p).expanduser()
    if not path.is_absolute() and folder is not None and not path.exists():
        path = folder / path
    return str(path)


def _by_split(data_files: Any, folder: Path | None) -> dict[str, list[str]]:
    """``--data.data_files`` (a path, a list, or {split: path(s)}) as split -> resolved paths."""
    spec = data_files if isinstance(data_files, Mapping) else {"train": data_files}
    return {str(k): [_as_path(f, folder) for f in (v if isinstance(v, (list, tuple)) else [v])]
            for k, v in spec.items()}


def locate(dataset: str, data_files: Any, data_dir: str | None) -> Source:
    """The :class:`Source` the data flags name: files, a folder (``data_dir``, or a ``dataset`` that is a local
    file or folder) or a dataset name."""
    folder = Path(data_dir).expanduser().resolve() if data_dir else None
    if data_files is not None:
        files = _by_split(data_files, folder)
        if not any(files.values()):
            raise DataError(f"--data.data_files {data_files!r} names no file; give a path, a list or "
                            "{split: path(s)}.")
        return Source(files=files, folder=folder)
    if folder is not None:
        return Source(folder=folder)
    local = Path(dataset).expanduser()
    if local.is_dir():
        return Source(folder=local.resolve(), name=dataset)
    if local.is_file():
        return Source(files={"train": [str(local.resolve())]})
    return Source(name=dataset)


def pick_format(source: Source, data_format: str | None = None) -> DataFormat:
    """The format named by ``data_format`` (checked against what it reads), else the first that claims ``source``."""
    if data_format is not None:
        fmt = get_format(data_format)
        if fmt.reads == "folder" and source.folder is None:
            raise DataError(f"data_format={data_format!r} needs --data.data_dir (the folder of files).")
        if fmt.reads == "name" and source.name is None:
            raise DataError(f"data_format={data_format!r} needs --data.dataset NAME (a dataset name, not files).")
        return fmt
    found = next((f for f in _ranked() if f.claims(source)), None)
    if found is not None:
        return found
    by_kind = {k: "|".join(f.name for f in _ranked() if f.reads == k) for k in ("files", "folder")}
    if source.files:
        raise DataError(f"cannot tell the format of {source.first!r}; pass --data.data_format {by_kind['files']} "
                        f"(or {by_kind['folder']} with --data.data_dir).")
    raise DataError(f"{source.folder} holds no metadata table (metadata.csv/.jsonl/.parquet or train.csv, ...) and "
                    "no image or audio files; point --data.data_dir at your data folder.")


def not_found(e: BaseException) -> DataError:
    """The one-line error for a data file that does not exist."""
    return DataError(f"data file not found: {e}; check --data.data_files (relative paths are taken from the working "
                     "directory, then from --data.data_dir).")


def read(fmt: DataFormat, source: Source) -> Splits:
    """``fmt``'s splits of ``source``; a file format given only a folder reads the folder's per-split tables.

    Errors a format does not translate itself become one-line DataErrors naming the data and the format.
    """
    if fmt.reads == "files" and not source.files and source.folder is not None:
        tables = split_tables(source.folder)
        if not tables:
            raise DataError(f"{source.folder} holds no {fmt.name} table (train{fmt.suffixes[0]}, ...); give the "
                            "files with --data.data_files.")
        source = dataclasses.replace(source, files={k: [v] for k, v in tables.items()})
    for paths in source.files.values():
        for f in paths:
            if Path(f).is_file() and Path(f).stat().st_size == 0:  # datasets would raise DatasetGenerationError
                raise DataError(f"data file {f!r} is empty (0 bytes); a table needs a header row and data rows.")
    try:
        return fmt.load(source)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise not_found(e) from e
    except Exception as e:  # a format's own parser errors: name the data and the format, keep the cause
        what = source.first if source.files else source.folder or source.name
        raise DataError(f"cannot read {str(what)!r} as {fmt.name} ({type(e).__name__}: {e}); check the data or "
                        "--data.data_format.") from e


def _open(dataset: str, data_files: Any, data_format: str | None, data_dir: str | None,
          streaming: bool) -> tuple[Splits, Path | None, str | None, Source | None]:
    """The splits a FusionDataModule names (lazily when ``streaming`` and the format ``streams``), the folder
    relative paths resolve against, a dataset name for model cards, and the located source (None: a named one)."""
    if data_files is None and data_dir is None:
        named = get_source(dataset)
        if named is not None:  # the project's own datasets (recipes/sources.py)
            splits, base = named.load()
            return splits, base, named.name, None
    source = locate(dataset, data_files, data_dir)
    fmt = pick_format(source, data_format)
    name = source.name if fmt.reads == "name" and source.folder is None else None  # a hub name goes on model cards
    lazily = streaming and fmt.streams
    return read(fmt, dataclasses.replace(source, streaming=True) if lazily else source), source.base, name, source


def load_source(dataset: str, data_files: Any, data_format: str | None,
                data_dir: str | None) -> tuple[datasets.DatasetDict, Path | None, str | None]:
    """Load the data a FusionDataModule names.

    Returns:
        (the splits, the folder relative paths in cells are resolved against, a dataset name for model cards or
        None for local data).
    """
    splits, base, name, _ = _open(dataset, data_files, data_format, data_dir, streaming=False)
    if not isinstance(splits, datasets.DatasetDict):
        raise DataError(f"the data loaded as {type(splits).__name__} without --data.streaming; a format's loader "
                        "returns a DatasetDict unless source.streaming is set.")
    return splits, base, name


Streamed = dict[str, tuple[datasets.IterableDataset, int | None]]  # split -> (its rows, its row count if known)


def _streamed(splits: datasets.DatasetDict) -> Streamed:
    return {name: (ds.to_iterable_dataset(), len(ds)) for name, ds in splits.items()}


def _known_rows(split: datasets.IterableDataset, name: str, files: Sequence[str]) -> int | None:
    """A streamed split's row count when the source states it: hub metadata or Parquet footers."""
    info = split.info.splits
    if info is not None and name in info and info[name].num_examples:
        return int(info[name].num_examples)
    if files and all(str(f).lower().endswith(".parquet") for f in files):
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        except (OSError, ValueError):
            return None
    return None


def load_stream(dataset: str, data_files: Any, data_format: str | None,
                data_dir: str | None) -> tuple[Streamed, Path | None, str | None]:
    """:func:`load_source` for ``--data.streaming``: every split as an iterable, with its row count when known.

    Formats registered with ``streams=True`` (CSV, JSON, Parquet, a folder of them, a hub dataset) read lazily;
    the others, and named sources, are read as usual and converted.
    """
    loaded, base, name, source = _open(dataset, data_files, data_format, data_dir, streaming=True)
    if isinstance(loaded, datasets.DatasetDict):  # read whole: a format that does not stream, or a named source
        return _streamed(loaded), base, name
    files: Mapping[str, Any] = {}
    if source is not None:
        files = source.files if source.files else (split_tables(source.folder) if source.folder else {})
    out: Streamed = {}
    for split, rows in loaded.items():
        given = files.get(split, [])
        out[split] = (rows, _known_rows(rows, split, [given] if isinstance(given, str) else list(given)))
    return out, base, name
