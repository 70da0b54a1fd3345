"""Table files: CSV/TSV, JSON/JSONL and Parquet, read by ``datasets``.

CSV is read as spreadsheets write it: a header without commas but with semicolons, tabs or pipes picks that
delimiter, and only an empty cell is missing (a class named "NA" stays text). Parser errors become one-line
DataErrors: an empty split, a file that is not UTF-8 (with the first bad byte), a file the parser rejects.
"""

from __future__ import annotations

import codecs
from typing import Any

import datasets

from fusion_errors import DataError

from . import Source, Splits, not_found, register_format


@register_format("csv", suffixes=(".csv", ".tsv"), rank=0, streams=True)
def read_csv(source: Source) -> Splits:
    """Comma-separated tables (semicolon, tab or pipe when the header says so); ``.tsv`` on tabs."""
    first = source.first
    kwargs: dict[str, Any] = {"delimiter": "\t"} if first.lower().endswith(".tsv") else {}
    if not kwargs and (sep := _header_delimiter(first)) is not None:
        kwargs = {"delimiter": sep}  # e.g. a European spreadsheet's export, "text;image;label"
    return read_with_datasets("csv", source, keep_default_na=False, na_values=[""], **kwargs)


@register_format("json", suffixes=(".json", ".jsonl"), rank=1, streams=True)
def read_json(source: Source) -> Splits:
    """A JSON array of rows, or JSON Lines (one object per line)."""
    return read_with_datasets("json", source)


@register_format("parquet", suffixes=(".parquet",), rank=2, streams=True)
def read_parquet(source: Source) -> Splits:
    """Apache Parquet files."""
    return read_with_datasets("parquet", source)


def read_with_datasets(builder: str, source: Source, **kwargs: Any) -> Splits:
    """``datasets.load_dataset(builder)`` over ``source.files`` (lazily with ``source.streaming``: an
    ``IterableDatasetDict``), its errors as one-line DataErrors."""
    files = {k: list(v) for k, v in source.files.items()}
    first = source.first
    try:
        if source.streaming:
            return datasets.load_dataset(builder, data_files=files, streaming=True, **kwargs)
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except FileNotFoundError as e:
        raise not_found(e) from e
    except ValueError as e:
        if "corresponds to no data" not in str(e):
            raise DataError(f"cannot read {first!r} as {builder} ({e}); check the file or --data.data_format.") from e
        raise DataError(f"a split of --data.data_files is empty ({e}); every split needs rows: fill or drop "
                        "that file.") from e
    except Exception as e:  # parser errors from pandas/pyarrow, wrapped by datasets in DatasetGenerationError
        cause = _root_cause(e)
        texts = [f for paths in files.values() for f in paths] if builder in ("csv", "json") else []
        bad = next(((f, where) for f in texts if (where := _first_bad_byte(f)) is not None), None)
        if bad is not None:  # a spreadsheet's legacy export (cp1252, latin-1): pandas and pyarrow read UTF-8 only
            raise DataError(f"{bad[0]!r} is not UTF-8 text ({bad[1]}); re-save it as UTF-8 (a spreadsheet's "
                            "'CSV UTF-8' export, or: iconv -f cp1252 -t utf-8 IN > OUT).") from e
        raise DataError(f"cannot read {first!r} as {builder} ({type(cause).__name__}: {cause}); check the "
                        "file or pass the right --data.data_format.") from e


def _header_delimiter(path: str) -> str | None:
    """The delimiter of a ``.csv`` whose header row has no comma but semicolons, tabs or pipes (spreadsheets in
    locales whose decimal mark is a comma export ``;``), else None (comma, the default)."""
    try:
        with open(path, "rb") as f:
            header = f.readline(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return None
    if "," in header:
        return None
    counts = {sep: header.count(sep) for sep in (";", "\t", "|")}
    sep = max(counts, key=lambda k: counts[k])
    return sep if counts[sep] else None


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception behind ``e`` (datasets wraps a parser's error in its own)."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return e


def _first_bad_byte(path: str) -> str | None:
    """Where the file at ``path`` stops being UTF-8 ("byte 0xe9 at offset 12, line 2"), or None if it is UTF-8
    (read in 1 MiB pieces, so memory stays small whatever the file's size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    try:
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                try:
                    decoder.decode(piece)
                except UnicodeDecodeError as e:
                    lines += piece[:max(e.start, 0)].count(b"\n")
                    at = min(max(e.start, 0), len(piece) - 1)  # a character split across pieces starts before
                    return f"byte 0x{piece[at]:02x} at offset {offset + at}, line {lines}"
                offset, lines = offset + len(piece), lines + piece.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"a truncated character at the end, offset {offset}"
    except OSError:
        return None
    return None
