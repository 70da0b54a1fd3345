"""easy-VQA, a public real benchmark: ``python benchmarks/easyvqa.py prepare|run|probe`` (docs/easyvqa.md).

``prepare OUT_DIR`` turns the installed ``easy-vqa`` package (``pip install easy-vqa``, MIT) into what a user would
write: ``images/{train,test}/<id>.png`` plus ``train.csv``, ``validation.csv``, ``test.csv`` with the columns
``image`` (path relative to OUT_DIR), ``question`` and ``answer``. Validation is carved from the train split by
image (a seeded 10% of the train images and all their questions), so no image is shared by train and validation.

``run OUT_DIR`` runs the documented command (``fusion-zoo fit --data.data_dir OUT_DIR --data.columns ...``) in a
subprocess, times it, reads the run's ``metrics.json`` and merges ``easyvqa_test_accuracy`` and
``easyvqa_seconds`` into ``benchmarks/results.json``. ``sweep OUT_DIR`` times ``fusion-zoo sweep`` of the default
grid (5 heads x 3 stages x 3 seeds) on the same folder and merges ``sweep_easyvqa_seconds``. ``probe OUT_DIR`` runs
benchmarks/fusion_probe.py.

The data is never committed: the default OUT_DIR is ``~/.cache/fusion-zoo/easyvqa``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._fit_run import run_fit  # noqa: E402
from fusion_common.atomic import atomic_write  # noqa: E402
from recipes.easyvqa import (  # noqa: E402
    _MARKER,
    COLUMNS,
    DEFAULT_DIR,
    prepare,
    read_rows,
    write_csv,
)

__all__ = ["DEFAULT_DIR", "COLUMNS", "FIT_ARGS", "read_rows", "write_csv", "prepare", "fit_command",
           "easyvqa_benchmark", "merge_results", "sweep_benchmark", "main"]

#: the documented command's flags after ``--data.data_dir DIR``: the CSV's question/answer columns named for
#: the model's text/label roles (the image column already has its role's name)
FIT_ARGS = ("--data.columns", '{"text": "question", "label": "answer"}')


def fit_command(data_dir: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """The documented command, as argv: ``fusion-zoo fit --data.data_dir DIR --data.columns ... [extra]``."""
    return ["fusion-zoo", "fit", "--data.data_dir", str(data_dir), *FIT_ARGS, *extra]


def easyvqa_benchmark(data_dir: str | Path = DEFAULT_DIR, extra: Sequence[str] = (), workdir: str | Path | None = None,
                      cache_dir: str | Path | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """Prepare easy-VQA if needed, run the documented fit in a subprocess and return its test accuracy and time.

    Args:
        data_dir: the prepared folder (prepared first if absent).
        extra: more ``fusion-zoo fit`` flags (e.g. ``--model.encoders ...``), recorded in the result.
        workdir: where ``runs/`` is written (default: a temporary folder, deleted afterwards).
        cache_dir: the feature cache; default a fresh empty one, so the time includes encoding (a cold start).
        timeout: seconds before the fit is stopped.

    Returns:
        ``easyvqa_test_accuracy`` (fused accuracy on the full test split), ``easyvqa_seconds`` (wall time of the
        whole command) and details (the command, per-modality test accuracies, the run folder or the error).
    """
    data = prepare(data_dir)
    argv = fit_command(data, extra)
    with tempfile.TemporaryDirectory(prefix="fz-easyvqa-") as scratch:
        cwd = Path(workdir).expanduser().resolve() if workdir else Path(scratch)
        cwd.mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir) if cache_dir else str(Path(scratch) / "feature-cache")
        fit = run_fit(argv, cwd, cache, timeout)
        details: dict[str, Any] = {"command": shlex.join(argv),
                                   "cache": "given" if cache_dir else "cold (empty feature cache)"}
        if fit.metrics is None:
            tail = fit.output[-2000:]
            return {"easyvqa_test_accuracy": None, "easyvqa_seconds": None, "easyvqa": {**details, "error": tail}}
        metrics = json.loads(fit.metrics.read_text())
    test = metrics["test"]
    details["test_accuracy"] = {row: vals.get("accuracy") for row, vals in test.items()}
    details["validation_fused_accuracy"] = metrics.get("validation", {}).get("fused", {}).get("accuracy")
    if workdir:
        details["run_dir"] = str(fit.metrics.parent)
    return {"easyvqa_test_accuracy": test["fused"]["accuracy"], "easyvqa_seconds": fit.seconds, "easyvqa": details}


def merge_results(values: dict[str, Any], path: str | Path = ROOT / "benchmarks" / "results.json",
                  targets: dict[str, tuple[str, float]] | None = None) -> Path:
    """Merge ``values`` into results.json (other keys kept); where ``targets`` names a key, record its target and
    whether it was met in the file's ``targets`` and ``met``. Written atomically."""
    path = Path(path)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.update(values)
    for key, (op, target) in (targets or {}).items():
        value = doc.get(key)
        doc.setdefault("targets", {})[key] = {"op": op, "value": target}
        doc.setdefault("met", {})[key] = None if value is None else (value >= target if op == ">=" else value <= target)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def sweep_benchmark(data_dir: str | Path = DEFAULT_DIR, extra: Sequence[str] = (), cache_dir: str | Path | None = None,
                    timeout: float = 7200.0) -> dict[str, Any]:
    """Time ``fusion-zoo sweep`` of the default grid on easy-VQA in a subprocess (``--jobs`` left at its default).

    Args:
        data_dir: the prepared folder.
        extra: more ``fusion-zoo sweep`` flags, recorded in the result.
        cache_dir: the feature cache (default: the user's; whether the features were encoded is recorded).
        timeout: seconds before the sweep is stopped.

    Returns:
        ``sweep_easyvqa_seconds`` (wall time of the whole command, feature loading included) and details: the
        command, the cell count, whether features were encoded, the best cell per head (mean over seeds).
    """
    data = prepare(data_dir)
    argv = ["fusion-zoo", "sweep", "--data.data_dir", str(data), *FIT_ARGS, *extra]
    with tempfile.TemporaryDirectory(prefix="fz-easyvqa-sweep-") as scratch:
        out = Path(scratch) / "sweep"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if cache_dir:
            env["FUSION_ZOO_CACHE"] = str(cache_dir)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "recipes.cli", *argv[1:], "--output-dir", str(out)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        details: dict[str, Any] = {"command": shlex.join(argv), "encoded": "feature cache computed" in proc.stderr
                                   + proc.stdout}
        if proc.returncode != 0:
            return {"sweep_easyvqa_seconds": None,
                    "sweep_easyvqa": {**details, "error": (proc.stdout + proc.stderr)[-2000:]}}
        rows = list(csv.DictReader((out / "results.csv").open()))
        workers = [line for line in proc.stdout.splitlines() if "worker processes" in line]
        details.update(cells=len(rows), workers=workers[0] if workers else "inline")
        means: dict[str, list[float]] = {}
        for r in rows:
            means.setdefault(f"{r['head']}@{r['stage']}", []).append(float(r["fused_accuracy"]))
        details["fused_accuracy"] = {k: round(float(np.mean(v)), 4) for k, v in means.items()}
    return {"sweep_easyvqa_seconds": seconds, "sweep_easyvqa": details}


TARGETS = {"easyvqa_test_accuracy": (">=", 0.99), "easyvqa_seconds": ("<=", 180.0),
           "sweep_easyvqa_seconds": ("<=", 1800.0)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write images + train/validation/test CSVs from the easy-vqa package")
    pp.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pp.add_argument("--val-fraction", type=float, default=0.1, help="share of train images held out (by image)")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    pr = sub.add_parser("run", help="time the documented fusion-zoo fit and merge its result into results.json")
    pr.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pr.add_argument("--workdir", default=None, help="keep runs/ here (default: a temporary folder)")
    pr.add_argument("--cache-dir", default=None, help="feature cache (default: a fresh one: a cold start)")
    pr.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"))
    pr.add_argument("--no-merge", action="store_true", help="print the result only")
    pr.add_argument("--timeout", type=float, default=3600.0)
    pr.epilog = "more `fusion-zoo fit` flags go after `--`: run OUT_DIR -- --trainer.max_epochs 20"
    ps = sub.add_parser("sweep", help="time fusion-zoo sweep of the default grid and merge sweep_easyvqa_seconds")
    ps.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    ps.add_argument("--cache-dir", default=None, help="feature cache (default: the user's)")
    ps.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"))
    ps.add_argument("--no-merge", action="store_true", help="print the result only")
    ps.epilog = "more `fusion-zoo sweep` flags go after `--`: sweep OUT_DIR -- --jobs 1"
    pb = sub.add_parser("probe", help="compare fusions on cached pooled features (benchmarks/fusion_probe.py)")
    pb.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pb.epilog = "fusion_probe.py options go after `--`: probe OUT_DIR -- --image-variants 128"
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(rest) - (1 if "--" in argv else 0)])
    if args.cmd == "prepare":
        out = prepare(args.out_dir, args.val_fraction, args.seed, args.force)
        print(f"easy-VQA written to {out}: {json.loads((out / _MARKER).read_text())['rows']}")
        return 0
    if args.cmd == "probe":
        from benchmarks.fusion_probe import main as probe_main

        return probe_main([str(prepare(args.out_dir)), *rest])
    if args.cmd == "sweep":
        result = sweep_benchmark(args.out_dir, rest, args.cache_dir)
        key = "sweep_easyvqa_seconds"
    else:
        result = easyvqa_benchmark(args.out_dir, rest, args.workdir, args.cache_dir, args.timeout)
        key = "easyvqa_test_accuracy"
    print(json.dumps(result, indent=2, default=str))
    if not args.no_merge:
        print(f"merged into {merge_results(result, args.results, {k: v for k, v in TARGETS.items() if k in result})}")
    return 0 if result[key] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
