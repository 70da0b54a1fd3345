"""``fusion-zoo predict --table new.csv``: a saved model's predictions for every row of a table (or every file of
a folder of images or audio), as a CSV.

The table is read exactly as ``fusion-zoo fit`` reads one (through :mod:`recipes.formats`: CSV/TSV/JSON(L)/parquet or
any registered format, spreadsheet delimiters, UTF-8 checks; relative file paths from the table's folder; the usual
column names), so a
model trained on ``train.csv`` predicts ``new.csv`` of the same layout with no flags. Rows are read, decoded and
predicted ``batch_size`` at a time, so memory does not grow with the table; the output file is written atomically.
A row whose cells cannot be used (a missing file, a corrupt image, every modality empty) gets its reason in the
``error`` column instead of stopping the run.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets

from fusion_common.atomic import atomic_write
from fusion_errors import DataError, InputError

from .cache import raw_view
from .data import COLUMN_ALIASES, raw_cell
from .formats import Source, load_source, pick_format, read, split_tables

__all__ = ["predict_table", "find_columns"]


def find_columns(names: list[str], modalities: list[str], given: Mapping[str, str] | None = None,
                 ) -> dict[str, str | None]:
    """modality -> the table column holding it: ``given`` first, then the modality's own name, then the one usual
    name present (``recipes.data.COLUMN_ALIASES``, as ``fit`` picks them); None when the table has none."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(modalities))
    if unknown:
        raise InputError(f"--columns maps {unknown}, which this model does not take; its modalities are "
                         f"{modalities}.")
    out: dict[str, str | None] = {}
    for m in modalities:
        if m in given:
            if given[m] not in names:
                raise DataError(f"column {given[m]!r} (for {m}) is not in the table; its columns are {names}.")
            out[m] = given[m]
            continue
        found = [m] if m in names else [a for a in COLUMN_ALIASES.get(m, ()) if a in names]
        out[m] = found[0] if len(found) == 1 else None
    if not any(out.values()):
        raise DataError(f"the table has no column for any of this model's modalities {modalities} (columns: "
                        f"{names}); map them with --columns '{{\"text\": \"<column>\"}}'.")
    return out


def _folder_rows(root: Path) -> tuple[datasets.Dataset, Path]:
    """Every file of the folder ``root`` (read by the folder format that claims it, as ``fit`` reads it), one row
    each over all its split sub-folders; ``label`` is None where a file has no class sub-folder."""
    source = Source(folder=root)
    fmt = pick_format(source)
    if fmt.name == "tablefolder":
        raise DataError(f"{root} holds tables ({', '.join(sorted(split_tables(root).values()))}); give one of them "
                        "as --table, or a folder of image or audio files.")
    splits = read(fmt, source)
    assert isinstance(splits, datasets.DatasetDict)  # not streaming: every format reads its splits whole
    parts = list(splits.values())
    if any("label" in p.column_names for p in parts):  # a split folder with files directly in it has no label
        parts = [p if "label" in p.column_names else p.add_column("label", [None] * len(p)) for p in parts]
    return datasets.concatenate_datasets(parts), root


def _result_columns(model: Any) -> list[str]:
    cfg = model.config
    if cfg.task == "regression":
        return [f"pred_{name}" for name in cfg.labels]
    return ["prediction", *(["probability"] if cfg.task == "multiclass" else []),
            *(f"prob_{name}" for name in cfg.labels)]


def _result_cells(model: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    cfg = model.config
    if cfg.task == "regression":
        return {f"pred_{k}": f"{v:.6g}" for k, v in row["values"].items()}
    probs = {f"prob_{k}": f"{p:.6f}" for k, p in row["probs"].items()}
    if cfg.task == "multiclass":
        return {"prediction": row["label"], "probability": f"{row['probs'][row['label']]:.6f}", **probs}
    return {"prediction": ";".join(row["labels"]), **probs}


def _plain(v: Any) -> Any:
    """A cell as the output CSV keeps it: text and numbers as they are, binary or nested cells left out."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v if isinstance(v, (str, int, float, bool)) else ""


def predict_table(model: Any, table: str | Path, output: str | Path, columns: Mapping[str, str] | None = None,
                  batch_size: int = 64, fold: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``model``'s prediction for every row of ``table`` to the CSV ``output``.

    The output keeps the table's text and number columns, then adds ``prediction``, ``probability`` (of the
    predicted class) and ``prob_<label>`` per label (multiclass; multilabel: the labels above the threshold joined
    by ``;``; regression: ``pred_<target>``), and ``error`` (empty, or why the row could not be predicted).

    Returns:
        ``{"rows", "predicted", "failed", "output", "columns"}`` (columns: modality -> table column or None).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer, e.g. --batch-size 64.")
    path = Path(table).expanduser()
    base: Path | None
    if path.is_dir():
        ds, base = _folder_rows(path)
    elif path.is_file():
        if Path(output).expanduser().resolve() == path.resolve():
            raise InputError(f"--output {str(output)!r} is the table itself; write the predictions to another file.")
        splits, base, _ = load_source(str(path), None, None, None)
        ds = splits[next(iter(splits))]
    else:
        raise DataError(f"table {str(path)!r} does not exist; give a CSV/TSV/JSON(L)/parquet file or a folder of "
                        "image or audio files.")
    names = list(ds.column_names)
    used = find_columns(names, list(model.modalities), columns)
    shown = ", ".join(f"{m} <- {c!r}" if c else f"{m}: no column (predicted without it)" for m, c in used.items())
    echo(f"predict: {len(ds)} rows of {path.name}; {shown}")
    for c in used.values():
        if c:
            ds = raw_view(ds, c)  # image/audio features stay undecoded: the encoders' loaders read them
    dtypes = {n: str(getattr(ds.features[n], "dtype", "")) for n in names}
    kept = [n for n in names if dtypes[n] in ("string", "large_string") or
            dtypes[n].startswith(("int", "uint", "float", "bool"))]
    added = [*_result_columns(model), "error"]
    out_name = {n: f"input_{n}" if n in added else n for n in kept}  # the table's own "prediction" column stays
    header = [*out_name.values(), *added]
    predicted = failed = 0
    start, step = time.perf_counter(), max(batch_size, (len(ds) // 10) // batch_size * batch_size)
    with atomic_write(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for chunk in ds.iter(batch_size=batch_size):
            n = len(chunk[names[0]])
            raw = {m: [raw_cell(m, v, base) for v in chunk[c]] for m, c in used.items() if c}
            results: list[dict[str, Any] | str] = []
            try:
                results = list(model.predict(**raw, batch_size=batch_size, explain=False, fold=fold))
            except InputError:  # find the unusable rows one by one; the others are predicted as usual
                for i in range(n):
                    one = {m: [v[i]] for m, v in raw.items()}
                    if all(v[0] is None for v in one.values()):
                        results.append(f"every modality's cell is empty ({', '.join(c for c in used.values() if c)})")
                        continue
                    try:
                        results.append(model.predict(**one, explain=False, fold=fold)[0])
                    except InputError as e:
                        results.append(str(e))
            for i, res in enumerate(results):
                cells = {out_name[k]: _plain(chunk[k][i]) for k in kept}
                if isinstance(res, str):
                    cells["error"], failed = res, failed + 1
                else:
                    cells.update(_result_cells(model, res))
                    predicted += 1
                writer.writerow(cells)
            done = predicted + failed
            if done % step < batch_size and done < len(ds):
                echo(f"predict: {done}/{len(ds)} rows ({time.perf_counter() - start:.0f}s)")
    echo(f"predict: {predicted} rows predicted, {failed} failed (see the error column) -> {output}")
    return {"rows": len(ds), "predicted": predicted, "failed": failed, "output": str(output), "columns": used}
