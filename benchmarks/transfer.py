"""Transfer from a zoo model: ``python benchmarks/transfer.py [EASYVQA_DIR]`` (docs/zoo.md, "What transfers").

For each training size (``--rows``, default 200 and 1,000 seeded easy-VQA training rows; 400 validation rows and
2,000 test rows, the subsets ``benchmarks/small_data.py`` writes) and each seed, two ``fusion-zoo fit`` runs with
every default otherwise:

* from scratch (the default recipe, its encoder and head probes included);
* ``--model.init_from <zoo model>`` (default ``easyvqa-early-concat``): the zoo model's encoders, stage, head and
  weights, fine-tuned on the small table.

Prints one JSON line per fit and a summary (mean test accuracy per size and start, the paired gain with its
spread), and with ``--merge`` records ``transfer_easyvqa`` in ``benchmarks/results.json``. The zoo model saw the
whole easy-VQA training split, so this measures reuse on the same task and label set (a user's small table of
the same kind), not transfer to a new task: test rows are never in any training split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.easyvqa import DEFAULT_DIR  # noqa: E402
from benchmarks.small_data import prepare  # noqa: E402


def fit(files: dict[str, Path], seed: int, init_from: str | None) -> dict[str, Any]:
    """One ``fusion-zoo fit`` (from scratch, or from ``init_from``); its fused test accuracy and wall time."""
    with tempfile.TemporaryDirectory(prefix="fz-transfer-") as tmp:
        argv = [sys.executable, "-m", "recipes.cli", "fit", "--seed_everything", str(seed),
                "--data.data_files", json.dumps({k: str(v) for k, v in files.items()}),
                "--trainer.default_root_dir", tmp, "--trainer.enable_progress_bar", "false"]
        if init_from:
            argv += ["--model.init_from", init_from]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"fit (init_from={init_from}) seed {seed} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-500:]}")
        metrics = json.loads(next(Path(tmp).rglob("metrics.json")).read_text())
    return {"start": "zoo" if init_from else "scratch", "seed": seed,
            "test_accuracy": round(float(metrics["test"]["fused"]["accuracy"]), 4),
            "seconds": round(time.perf_counter() - start, 1)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size: mean test accuracy from scratch and from the zoo model, and the paired gain (mean, min, max)."""
    out: dict[str, Any] = {}
    for rows in sorted({r["rows"] for r in runs}):
        by = {s: {r["seed"]: r["test_accuracy"] for r in runs if r["rows"] == rows and r["start"] == s}
              for s in ("scratch", "zoo")}
        seeds = sorted(set(by["scratch"]) & set(by["zoo"]))
        gains = [by["zoo"][s] - by["scratch"][s] for s in seeds]
        out[str(rows)] = {"scratch": round(float(np.mean(list(by["scratch"].values()))), 4),
                          "zoo": round(float(np.mean(list(by["zoo"].values()))), 4),
                          "gain": round(float(np.mean(gains)), 4) if gains else None,
                          "gain_min": round(min(gains), 4) if gains else None,
                          "gain_max": round(max(gains), 4) if gains else None, "seeds": seeds}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=str(DEFAULT_DIR))
    p.add_argument("--rows", default="200,1000", help="training sizes, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="easyvqa-early-concat", help="the zoo model to start from")
    p.add_argument("--merge", action="store_true", help="record transfer_easyvqa in benchmarks/results.json")
    args = p.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for rows in (int(n) for n in args.rows.split(",")):
        files = prepare(Path(args.folder).expanduser(), rows)
        for seed in (int(s) for s in args.seeds.split(",")):
            for start in (None, args.model):
                runs.append({"rows": rows, **fit(files, seed, start)})
                print(json.dumps(runs[-1]), flush=True)
    summary = {"model": args.model, "per_rows": summarise(runs), "runs": runs}
    print(json.dumps(summary["per_rows"]))
    if args.merge:
        from benchmarks.easyvqa import merge_results
        from benchmarks.run import cpu_model

        merge_results({"transfer_easyvqa": {**summary, "cpu": cpu_model(),
                                              "load_average_after": [round(x, 2) for x in os.getloadavg()]}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
