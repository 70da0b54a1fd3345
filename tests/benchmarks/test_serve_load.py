"""``benchmarks/serve_load.py``: merging a run into results.json (the load itself is a benchmark, not a test)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of scripts, not installed
serve_load = importlib.import_module("benchmarks.serve_load")
TARGETS, main, merge_results = serve_load.TARGETS, serve_load.main, serve_load.merge_results


def test_an_overload_run_merges_its_keys_and_keeps_the_batching_ones(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"easyvqa_seconds": 12.0, "serve_p99_ms": 900.0, "serve_batching_speedup": 3.1,
                                "targets": {"serve_p99_ms": {"op": "<=", "value": 30000.0}},
                                "met": {"serve_p99_ms": True}}))
    out = {"serve_overload_503_share": 0.4, "serve_overload_p99_ms": 16000.0, "serve_overload_recovery_s": 2.5,
           "serve_overload": {"statuses": {"200": 600, "503": 400}, "host": {"load_average": "1.00 1.00 1.00"}}}
    merge_results(out, path)
    doc = json.loads(path.read_text())
    assert (doc["easyvqa_seconds"], doc["serve_p99_ms"], doc["serve_batching_speedup"]) == (12.0, 900.0, 3.1)
    assert doc["met"]["serve_p99_ms"] is True  # the batching phase did not run: its keys stay as they were
    assert doc["serve_overload_503_share"] == 0.4 and doc["serve_overload"]["statuses"]["503"] == 400
    assert doc["targets"]["serve_overload_p99_ms"] == {"op": "<=", "value": TARGETS["serve_overload_p99_ms"][1]}
    assert doc["met"]["serve_overload_p99_ms"] is False and doc["met"]["serve_overload_recovery_s"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # written in one rename, no temp file left


def test_unknown_phases_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--phases", "batching,warp"])
    assert e.value.code == 2 and "choose from batching, overload" in capsys.readouterr().err
