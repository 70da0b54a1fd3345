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
import io
import json
import os
import random
import shlex
import shutil
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

from encoders import DataError, MissingDependencyError  # noqa: E402
from encoders._atomic import atomic_write  # noqa: E402

__all__ = ["DEFAULT_DIR", "FIT_ARGS", "read_rows", "write_csv", "prepare", "fit_command", "easyvqa_benchmark",
           "merge_results", "sweep_benchmark", "main"]

DEFAULT_DIR = Path("~/.cache/fusion-zoo/easyvqa").expanduser()
COLUMNS = ("image", "question", "answer")
#: the documented command's flags after ``--data.data_dir DIR``: the CSV's question/answer columns named for
#: the model's text/label roles (the image column already has its role's name)
FIT_ARGS = ("--data.columns", '{"text": "question", "label": "answer"}')
_MARKER = "prepared.json"
_FORMAT = 1  # bump when the written layout changes: an older folder is then rebuilt by ``prepare --force``


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
        raise DataError(f"{path} is missing; run `python benchmarks/easyvqa.py prepare {Path(folder)}` first.")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` by renames (an existing ``out`` is moved aside, then deleted), so
    an interrupted prepare leaves the old folder or the new one, never half of one."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
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
        swap_in(tmp, out)  # an existing out is ours (checked above)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def fit_command(data_dir: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """The documented command, as argv: ``fusion-zoo fit --data.data_dir DIR --data.columns ... [extra]``."""
    return ["fusion-zoo", "fit", "--data.data_dir", str(data_dir), *FIT_ARGS, *extra]


def _new_metrics(runs: Path, before: set[Path]) -> Path:
    made = sorted((p for p in runs.glob("fit-*") if p not in before), key=lambda p: p.stat().st_mtime)
    found = [m for run in made for m in sorted(run.rglob("metrics.json"))]
    if not found:
        raise DataError(f"the fit wrote no metrics.json under {runs} (new run folders: {[p.name for p in made]}).")
    return found[-1]


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
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "FUSION_ZOO_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        runs = cwd / "runs"
        before = set(runs.glob("fit-*")) if runs.is_dir() else set()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "recipes.cli", *argv[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        details: dict[str, Any] = {"command": shlex.join(argv),
                                   "cache": "given" if cache_dir else "cold (empty feature cache)"}
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-2000:]
            return {"easyvqa_test_accuracy": None, "easyvqa_seconds": None, "easyvqa": {**details, "error": tail}}
        metrics = json.loads(_new_metrics(runs, before).read_text())
    test = metrics["test"]
    details["test_accuracy"] = {row: vals.get("accuracy") for row, vals in test.items()}
    details["validation_fused_accuracy"] = metrics.get("validation", {}).get("fused", {}).get("accuracy")
    if workdir:
        details["run_dir"] = str(_new_metrics(runs, before).parent)
    return {"easyvqa_test_accuracy": test["fused"]["accuracy"], "easyvqa_seconds": seconds, "easyvqa": details}


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
