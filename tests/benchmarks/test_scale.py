"""The scale benchmark's table and row-check step (benchmarks/scale.py) on a few rows; no timing assertions."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
scale = importlib.import_module("benchmarks.scale")
run = importlib.import_module("benchmarks.run")


def test_the_table_has_unique_texts_and_images(tmp_path: Path) -> None:
    rows = list(csv.DictReader(scale.write_table(tmp_path, 20).open()))
    assert len(rows) == 20 and len({r["text"] for r in rows}) == 20
    images = {(tmp_path / r["image"]).read_bytes() for r in rows}
    assert len(images) == 20 and {r["label"] for r in rows} == {"a", "b"}


def test_the_warm_row_check_step_reports_its_key(tmp_path: Path) -> None:
    out = scale.warm_rowcheck(n=40, keep=tmp_path)
    assert out["rows"] == 32 and out["scale_warm_rowcheck_seconds_per_100k"] > 0
    assert (tmp_path / "cache-rowcheck" / "row-checks.json").is_file()  # the warm run read the stored checks


def test_scale_steps_are_optional_and_have_targets() -> None:
    for keys in run.OPTIONAL_STEPS.values():
        assert all(k in run.TARGETS for k in keys)
