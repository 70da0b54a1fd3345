"""Small real data: ``python benchmarks/small_data.py [EASYVQA_DIR]`` (docs/recipes.md, the default head).

A user's own data set is often a few hundred rows. This takes 400 easy-VQA training rows (``--train-rows``),
400 validation rows and 2000 test rows (seeded shuffles of the prepared splits, written as
``small<N>_{train,validation,test}.csv`` next to the prepared ones, whose image paths they share), then:

* ``fusion-zoo fit`` with every default except ``--model.fusion_head`` (each of ``--heads``) and
  ``--seed_everything`` (each of ``--seeds``), reading each run's fused test accuracy from its metrics.json;
* a logistic regression on raw features: question word 1-2-grams + 16 x 16 RGB pixels (standardised), its C
  chosen on the validation rows.

The same script measures a user-sized sample: ``--train-rows 7000 --val-rows 800 --test-rows -1 --heads concat
--seeds 42 --merge easyvqa_small_test_accuracy`` (7,000 seeded training rows, 800 validation rows, the whole test
split); ``--merge small_data_test_accuracy`` records the 400-row figure. Prints one JSON line per fit and a
summary line (mean per head). Needs ``benchmarks/easyvqa.py prepare`` first
(default folder ``~/.cache/fusion-zoo/easyvqa``) and scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.easyvqa import COLUMNS, DEFAULT_DIR, read_rows, write_csv  # noqa: E402

SIZES = {"train": 400, "validation": 400, "test": 2000}
#: targets of the figures ``--merge`` writes (issue: small data and a user-sized easy-VQA sample)
MERGE_TARGETS = {"small_data_test_accuracy": (">=", 0.70), "easyvqa_small_test_accuracy": (">=", 0.98)}


def prepare(folder: Path, train_rows: int | None = None, val_rows: int | None = None,
            test_rows: int | None = None) -> dict[str, Path]:
    """Write the seeded subsets as ``small<train>[-<val>-<test>]_<split>.csv`` in ``folder`` (a negative count:
    the whole split); returns split -> path."""
    out = {}
    train_rows = SIZES["train"] if train_rows is None else train_rows
    val_rows = SIZES["validation"] if val_rows is None else val_rows
    test_rows = SIZES["test"] if test_rows is None else test_rows
    sizes = {"train": train_rows, "validation": val_rows, "test": test_rows}
    tag = f"small{train_rows}" if (val_rows, test_rows) == (SIZES["validation"], SIZES["test"]) else \
        f"small{train_rows}-{val_rows}-{test_rows}"
    for split, n in sizes.items():
        rows = read_rows(folder, split, seed=0)
        rows = rows[:n] if n >= 0 else rows
        out[split] = folder / f"{tag}_{split}.csv"
        write_csv(out[split], COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    return out


def fit(files: dict[str, Path], head: str, seed: int) -> dict[str, Any]:
    """One default ``fusion-zoo fit`` with ``head`` and ``seed``; its fused test accuracy and wall time."""
    with tempfile.TemporaryDirectory(prefix="fz-small-") as tmp:
        argv = [sys.executable, "-m", "recipes.cli", "fit", "--seed_everything", str(seed),
                "--data.data_files", json.dumps({k: str(v) for k, v in files.items()}),
                "--model.fusion_head", head, "--trainer.default_root_dir", tmp,
                "--trainer.enable_progress_bar", "false"]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"fit {head} seed {seed} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        metrics = json.loads(next(Path(tmp).rglob("metrics.json")).read_text())
    acc = round(float(metrics["test"]["fused"]["accuracy"]), 4)
    return {"head": head, "seed": seed, "test_accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}


def raw_baseline(files: dict[str, Path]) -> dict[str, Any]:
    """Logistic regression on question 1-2-grams + 16 x 16 pixels; C picked on validation, scored on test."""
    from PIL import Image
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def load(path: Path) -> tuple[list[dict[str, str]], np.ndarray]:
        rows = read_rows(path.parent, path.stem)
        pixels = [np.asarray(Image.open(path.parent / r["image"]).convert("RGB").resize((16, 16))).ravel() / 255.0
                  for r in rows]
        return rows, np.stack(pixels)  # [N, 768]

    data = {split: load(path) for split, path in files.items()}
    words = CountVectorizer(ngram_range=(1, 2)).fit([r["question"] for r in data["train"][0]])
    scale = StandardScaler().fit(data["train"][1])

    def features(split: str) -> Any:
        rows, pixels = data[split]
        return hstack([words.transform([r["question"] for r in rows]), csr_matrix(scale.transform(pixels))]).tocsr()

    labels = {split: [r["answer"] for r in rows] for split, (rows, _) in data.items()}
    fits = {c: LogisticRegression(max_iter=5000, C=c).fit(features("train"), labels["train"])
            for c in (0.01, 0.1, 1.0, 10.0)}
    best = max(fits, key=lambda c: fits[c].score(features("validation"), labels["validation"]))
    return {"C": best, "test_accuracy": round(float(fits[best].score(features("test"), labels["test"])), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=str(DEFAULT_DIR))
    p.add_argument("--heads", default="concat,gating")
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--train-rows", type=int, default=SIZES["train"], help="training rows")
    p.add_argument("--val-rows", type=int, default=SIZES["validation"], help="validation rows (-1: all)")
    p.add_argument("--test-rows", type=int, default=SIZES["test"], help="test rows (-1: the whole test split)")
    p.add_argument("--merge", default=None, metavar="KEY",
                   help="merge the first head's mean test accuracy into benchmarks/results.json as KEY "
                        "(small_data_test_accuracy, easyvqa_small_test_accuracy)")
    p.add_argument("--no-baseline", action="store_true", help="skip the logistic regression on raw features")
    args = p.parse_args(argv)
    files = prepare(Path(args.folder).expanduser(), args.train_rows, args.val_rows, args.test_rows)
    runs = []
    for head in args.heads.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.append(fit(files, head, seed))
            print(json.dumps(runs[-1]), flush=True)
    summary: dict[str, Any] = {"rows": {k: sum(1 for _ in read_rows(v.parent, v.stem)) for k, v in files.items()}}
    if not args.no_baseline:
        summary["raw_logistic_regression"] = raw_baseline(files)
    for head in args.heads.split(","):
        accs = [r["test_accuracy"] for r in runs if r["head"] == head]
        summary[head] = {"mean": round(float(np.mean(accs)), 4), "each": accs,
                         "seconds": [r["seconds"] for r in runs if r["head"] == head]}
    print(json.dumps(summary))
    if args.merge:
        from benchmarks.easyvqa import merge_results
        from benchmarks.run import cpu_model

        head = args.heads.split(",")[0]
        target = MERGE_TARGETS.get(args.merge)
        merge_results({args.merge: summary[head]["mean"], f"{args.merge}_details": {**summary, "cpu": cpu_model()}},
                      targets={args.merge: target} if target else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
