"""easy-VQA (MIT, the ``easy-vqa`` pip package) as a folder a user would write, and as ``--data.dataset easyvqa``.

:func:`prepare` turns the installed package into ``images/{train,test}/<id>.png`` plus ``train.csv``,
``validation.csv`` and ``test.csv`` with the columns ``image`` (path relative to the folder), ``question`` and
``answer``. Validation is carved from the train split by image (a seeded 10% of the train images and all their
questions), so no image is shared by train and validation. The named source prepares the folder once (under
``~/.cache/fusion-zoo/easyvqa``) and reads it like any folder of tables: ``question`` and ``answer`` are the text
and label columns by their usual names. Nothing of the data is in the repository.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fusion_common.atomic import atomic_folder, atomic_write
from fusion_errors import DataError, MissingDependencyError

from .sources import register_source

__all__ = ["DEFAULT_DIR", "COLUMNS", "prepare", "read_rows", "write_csv"]

DEFAULT_DIR = Path("~/.cache/fusion-zoo/easyvqa").expanduser()
COLUMNS = ("image", "question", "answer")
_MARKER = "prepared.json"
_FORMAT = 1  # bump when the written layout changes: an older folder is then rebuilt by ``prepare(force=True)``


def _easy_vqa() -> Any:
    try:
        import easy_vqa
    except ImportError as e:
        raise MissingDependencyError("the easy-VQA benchmark needs the easy-vqa package: pip install easy-vqa") from e
    return easy_vqa


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV table as a user would write it (header + rows), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_rows(folder: str | Path, split: str, seed: int | None = None) -> list[dict[str, str]]:
    """The rows of ``<folder>/<split>.csv`` written by ``prepare`` (shuffled by ``seed`` when given); a missing
    table is a DataError naming the ``prepare`` command."""
    path = Path(folder) / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing; run `python benchmarks/easyvqa.py prepare {Path(folder)}` first (or "
                        "train on --data.dataset easyvqa).")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def _write_csv(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    write_csv(path, COLUMNS, rows)


def _split_rows(questions: tuple[list[str], list[str], list[int]], split: str,
                paths: dict[int, str]) -> list[tuple[int, tuple[str, str, str]]]:
    """(image id, csv row) per question of one easy-VQA split; fails on a question whose image is absent."""
    texts, answers, image_ids = questions
    missing = sorted({i for i in image_ids if i not in paths})
    if missing:
        raise DataError(f"easy-VQA {split}: {len(missing)} questions refer to images that are not in the package "
                        f"(first id {missing[0]}); reinstall it: pip install --force-reinstall easy-vqa")
    return [(i, (f"images/{split}/{i}.png", q, a)) for q, a, i in zip(texts, answers, image_ids, strict=True)]


def _is_current(out: Path, val_fraction: float, seed: int) -> bool:
    try:
        meta = json.loads((out / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _FORMAT and meta.get("val_fraction") == val_fraction and meta.get("seed") == seed


def prepare(out_dir: str | Path = DEFAULT_DIR, val_fraction: float = 0.1, seed: int = 0, force: bool = False) -> Path:
    """Write the easy-VQA folder (images and train/validation/test CSVs) to ``out_dir``; returns it.

    A folder this function wrote with the same settings is reused as is. The folder is built next to ``out_dir``
    and renamed into place, so an interrupted run never leaves a half-written ``out_dir``.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1): the share of train images held out.")
    out = Path(out_dir).expanduser().resolve()
    if _is_current(out, val_fraction, seed) and not force:
        return out
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise DataError(f"{out} exists and was not written by `easyvqa.py prepare`; choose an empty or new folder.")
    ev = _easy_vqa()
    answers = ev.get_answers()
    train_paths, test_paths = ev.get_train_image_paths(), ev.get_test_image_paths()
    train = _split_rows(ev.get_train_questions(), "train", train_paths)
    test = _split_rows(ev.get_test_questions(), "test", test_paths)
    unknown = sorted({row[2] for _, row in train + test} - set(answers))
    if unknown:
        raise DataError(f"easy-VQA answers {unknown} are not in its answers.txt; reinstall easy-vqa.")
    # validation = every question of a seeded share of the train images
    ids = np.array(sorted({i for i, _ in train}))
    n_val = max(1, round(len(ids) * val_fraction))
    val_ids = set(np.random.default_rng(seed).permutation(ids)[:n_val].tolist())
    # an existing out is ours (checked above); the images are a copy of an installed package: no fsync
    with atomic_folder(out, fsync=False) as tmp:
        for split, paths in (("train", train_paths), ("test", test_paths)):
            folder = tmp / "images" / split
            folder.mkdir(parents=True)
            for i, src in paths.items():
                try:
                    shutil.copyfile(src, folder / f"{i}.png")
                except OSError as e:
                    raise DataError(f"cannot copy easy-VQA image {src!r} ({e}); reinstall the package: "
                                    "pip install --force-reinstall easy-vqa") from e
        _write_csv(tmp / "train.csv", [row for i, row in train if i not in val_ids])
        _write_csv(tmp / "validation.csv", [row for i, row in train if i in val_ids])
        _write_csv(tmp / "test.csv", [row for _, row in test])
        counts = {"train": sum(i not in val_ids for i, _ in train), "validation": sum(i in val_ids for i, _ in train),
                  "test": len(test), "train_images": len(ids) - n_val, "validation_images": n_val,
                  "test_images": len(test_paths)}
        meta = {"format": _FORMAT, "val_fraction": val_fraction, "seed": seed, "answers": answers, "rows": counts,
                "source": "pip package easy-vqa (MIT)"}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out


@register_source("easyvqa", "easy-VQA: questions about images of one coloured shape (13 answers)",
                 "the easy-vqa pip package (MIT), prepared into ~/.cache/fusion-zoo/easyvqa")
def _easyvqa_source() -> tuple[datasets.DatasetDict, Path | None]:
    from .formats import load_source

    splits, base, _ = load_source(str(prepare(DEFAULT_DIR)), None, None, None)
    return splits, base
