"""Held-out speakers: a proxy for real spoken digits + degraded handwritten digits (docs/heldout_speakers.md).

``python benchmarks/heldout_speakers.py prepare|run|baseline [DIR]``

``prepare DIR`` writes what a user with recordings like the Free Spoken Digit Dataset would have: ``audio/*.wav``
(8 kHz mono int16, silence-trimmed, random gain, mild background noise), spoken by espeak-ng *speakers* (an accent +
a voice variant, with a random speed and pitch per clip); ``images/*.png`` (28x28 grayscale, heavily degraded
handwritten digits from scikit-learn's ``load_digits``); and ``train.csv``, ``validation.csv``, ``test.csv`` with the
columns ``image,audio,label,speaker``. Validation has the train speakers; the test speakers (accents *and* variants)
are never heard in training, and the test images are never seen in training. ``speaker`` is an extra column the fit
must ignore.

``baseline DIR`` fits logistic regressions on raw MFCC mean+std, raw pixels and both, and prints test accuracies.

``run DIR`` runs a bare ``fusion-zoo fit --data.data_dir DIR`` with a cold feature cache, times it and merges
``heldout_speakers_test_accuracy``, ``heldout_speakers_seconds``, ``heldout_speakers_baseline_lr`` and
``heldout_speakers`` (details) into ``benchmarks/results.json``.

The data is never committed: the default DIR is ``~/.cache/fusion-zoo/heldout-speakers``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._fit_run import run_fit  # noqa: E402
from benchmarks.easyvqa import merge_results  # noqa: E402
from fusion_errors import DataError  # noqa: E402
from recipes.heldout_speakers import (  # noqa: E402
    DEFAULT_DIR,
    IMAGE_SIZE,
    MARKER,
    RATE,
    TEST_SPEAKERS,
    TRAIN_SPEAKERS,
    degrade,
    prepare,
)

__all__ = ["DEFAULT_DIR", "TRAIN_SPEAKERS", "TEST_SPEAKERS", "prepare", "degrade", "baseline", "heldout_benchmark",
           "main"]

def _read_split(data: Path, split: str) -> list[dict[str, str]]:
    with open(data / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def mfcc_stats(path: Path, rate: int = RATE) -> np.ndarray:
    """Raw MFCC (20 coefficients) mean and std over time of one audio file -> [40]."""
    import soundfile as sf
    import torch
    import torchaudio

    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    x = torch.from_numpy(wav.mean(1))  # [T]
    if sr != rate:
        x = torchaudio.functional.resample(x, sr, rate)
    m = torchaudio.transforms.MFCC(sample_rate=rate, n_mfcc=20, melkwargs={"n_fft": 256, "hop_length": 80,
                                                                           "n_mels": 40})(x)  # [20, F]
    return torch.cat([m.mean(1), m.std(1)]).numpy()


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32).ravel() / 255


def baseline(data_dir: str | Path = DEFAULT_DIR) -> dict[str, float]:
    """Test accuracy of logistic regressions (fit on train) on raw MFCC stats, raw pixels and both."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = Path(data_dir).expanduser().resolve()
    feats = {}
    for split in ("train", "test"):
        rows = _read_split(data, split)
        audio = np.stack([mfcc_stats(data / r["audio"]) for r in rows])
        image = np.stack([_pixels(data / r["image"]) for r in rows])
        feats[split] = ({"audio": audio, "image": image, "both": np.hstack([audio, image])},
                        np.array([int(r["label"]) for r in rows]))
    out = {}
    for name in ("audio", "image", "both"):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(feats["train"][0][name], feats["train"][1])
        out[name] = float((clf.predict(feats["test"][0][name]) == feats["test"][1]).mean())
    return out


def heldout_benchmark(data_dir: str | Path = DEFAULT_DIR, extra: Sequence[str] = (), workdir: str | Path | None = None,
                      cache_dir: str | Path | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """A bare ``fusion-zoo fit --data.data_dir DIR`` (cold feature cache) -> fused/per-modality test accuracy, time.

    ``cache_dir`` keeps the feature cache for later experiments; it must be new or empty, so the fit stays cold.
    """
    data = prepare(data_dir)
    if cache_dir is not None and Path(cache_dir).expanduser().is_dir() and any(Path(cache_dir).expanduser().iterdir()):
        raise DataError(f"--cache-dir {cache_dir} is not empty; the timed fit must start cold: give a new folder.")
    argv = ["fusion-zoo", "fit", "--data.data_dir", str(data), *extra]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fz-heldout-") as scratch:
        cwd = Path(workdir).expanduser().resolve() if workdir else Path(scratch)
        cwd.mkdir(parents=True, exist_ok=True)
        cache = Path(cache_dir).expanduser().resolve() if cache_dir else Path(scratch) / "cache"
        fit = run_fit(argv, cwd, cache, timeout)
        seconds = fit.seconds
        details: dict[str, Any] = {"command": shlex.join(argv), "cache": "cold (empty feature cache)",
                                   "load_average_before": [round(v, 2) for v in load_before],
                                   "load_average_after": [round(v, 2) for v in os.getloadavg()]}
        if fit.metrics is None:
            details["error"] = fit.output[-2000:]
            return {"heldout_speakers_test_accuracy": None, "heldout_speakers_seconds": seconds,
                    "heldout_speakers": details}
        metrics_path = fit.metrics
        metrics = json.loads(metrics_path.read_text())
        if workdir:
            details["run_dir"] = str(metrics_path.parent)
    details["test_accuracy"] = {row: vals.get("accuracy") for row, vals in metrics["test"].items()}
    details["validation_accuracy"] = {row: vals.get("accuracy") for row, vals in metrics.get("validation", {}).items()}
    return {"heldout_speakers_test_accuracy": metrics["test"]["fused"]["accuracy"],
            "heldout_speakers_seconds": seconds, "heldout_speakers": details}


TARGETS = {"heldout_speakers_test_accuracy": (">=", 0.975), "heldout_speakers_seconds": ("<=", 600.0)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="synthesise the folder (audio, images, train/validation/test CSVs)")
    pp.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    pb = sub.add_parser("baseline", help="logistic regressions on raw MFCC stats and raw pixels")
    pb.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pr = sub.add_parser("run", help="time a bare fusion-zoo fit and merge its result into results.json")
    pr.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    pr.add_argument("--workdir", default=None, help="keep runs/ here (default: a temporary folder)")
    pr.add_argument("--cache-dir", default=None, help="keep the (cold: new or empty) feature cache here")
    pr.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"))
    pr.add_argument("--no-merge", action="store_true", help="print the result only")
    pr.add_argument("--no-baseline", action="store_true", help="skip the logistic-regression baseline")
    pr.add_argument("--timeout", type=float, default=3600.0)
    pr.epilog = "more `fusion-zoo fit` flags go after `--` (the recorded result is then no longer a bare fit)"
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(rest) - (1 if "--" in argv else 0)])
    if args.cmd == "prepare":
        out = prepare(args.out_dir, args.seed, args.force)
        print(f"held-out speakers written to {out}: {json.loads((out / MARKER).read_text())['rows']}")
        return 0
    if args.cmd == "baseline":
        print(json.dumps(baseline(prepare(args.out_dir)), indent=2))
        return 0
    result = heldout_benchmark(args.out_dir, rest, args.workdir, args.cache_dir, args.timeout)
    if not args.no_baseline:
        result["heldout_speakers_baseline_lr"] = baseline(args.out_dir)
    print(json.dumps(result, indent=2, default=str))
    if not args.no_merge:
        print(f"merged into {merge_results(result, args.results, TARGETS)}")
    return 0 if result["heldout_speakers_test_accuracy"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
