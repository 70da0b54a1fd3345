"""``fusion-zoo fit`` in a subprocess, timed, with its own feature cache: the run the real-data benchmarks measure.

Offline (``HF_HUB_OFFLINE``), with this checkout first on ``PYTHONPATH``; the run's ``metrics.json`` is found among
the run folders the fit made under ``<cwd>/runs``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fusion_errors import DataError

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["FitRun", "run_fit", "new_metrics"]


@dataclass(frozen=True)
class FitRun:
    """One timed fit: wall ``seconds`` of the whole command, its exit code and output, and its metrics file."""

    seconds: float
    returncode: int
    output: str  # stdout then stderr
    metrics: Path | None  # the new run's metrics.json; None when the fit failed


def run_fit(argv: Sequence[str], cwd: Path, cache: str | Path, timeout: float) -> FitRun:
    """Run ``argv`` (``["fusion-zoo", "fit", ...]``) as ``python -m recipes.cli fit ...`` in ``cwd`` with the
    feature cache ``cache``; ``timeout`` seconds before it is stopped (``subprocess.TimeoutExpired``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FUSION_ZOO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = cwd / "runs"
    before = set(runs.glob("fit-*")) if runs.is_dir() else set()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recipes.cli", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    metrics = new_metrics(runs, before) if proc.returncode == 0 else None
    return FitRun(seconds, proc.returncode, proc.stdout + proc.stderr, metrics)


def new_metrics(runs: Path, before: set[Path]) -> Path:
    """The ``metrics.json`` of the newest run folder under ``runs`` that is not in ``before``."""
    made = sorted((p for p in runs.glob("fit-*") if p not in before), key=lambda p: p.stat().st_mtime)
    found = [m for run in made for m in sorted(run.rglob("metrics.json"))]
    if not found:
        raise DataError(f"the fit wrote no metrics.json under {runs} (new run folders: {[p.name for p in made]}).")
    return found[-1]
