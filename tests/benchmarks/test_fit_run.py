"""benchmarks/_fit_run.py: the metrics of the run the fit made are found, not an older run's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks._fit_run import new_metrics
from fusion_errors import DataError


def _run(runs: Path, name: str, mtime: float) -> Path:
    metrics = runs / name / "version_0" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    os.utime(runs / name, (mtime, mtime))
    return metrics


def test_the_newest_new_run_is_found(tmp_path: Path) -> None:
    old = _run(tmp_path, "fit-old", 3_000.0)  # newest of all, but there before the fit
    _run(tmp_path, "fit-a", 1_000.0)
    newest = _run(tmp_path, "fit-b", 2_000.0)
    assert new_metrics(tmp_path, {old.parents[1]}) == newest


def test_a_fit_that_made_no_metrics_says_so(tmp_path: Path) -> None:
    (tmp_path / "fit-empty").mkdir()
    with pytest.raises(DataError, match="no metrics.json.*fit-empty"):
        new_metrics(tmp_path, set())
