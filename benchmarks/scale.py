"""Memory and row-check time as the table grows (issue 31): the steps ``scale_pooled``, ``scale_tokens`` and
``scale_rowcheck`` of ``benchmarks/run.py`` (optional: ``--only scale_pooled,...``).

A table of unique short texts and unique 16 x 16 PNGs is written for each size; ``fusion-zoo fit`` (``tiny-text`` +
``pixels``, 1 epoch) runs on it in a fresh subprocess with its own feature cache, empty (encoding included). The
slope of the job's peak RSS between two sizes, per 100k rows, is what grows with the data; the constant part
(Python, torch, Lightning) cancels. ``scale_rowcheck`` times the row checks of the larger table's training split
again, warm (every file checked before), per 100k rows.
"""

from __future__ import annotations

import csv
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

from benchmarks.measure import FIT_PEAK_CODE  # noqa: E402

__all__ = ["write_table", "scale_rss", "warm_rowcheck", "SIZES"]

SIZES = (10_000, 40_000)  # rows; the slope between them is reported per 100k rows
ENCODERS = "--model.encoders={text: tiny-text, image: pixels}"



def write_table(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of a unique short text, a unique 16 x 16 grey PNG and a label a/b; returns the CSV's path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    words = ["red", "blue", "small", "large", "round", "flat", "old", "new"]
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "image", "label"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
            text = f"{words[i % 8]} {words[(i // 8) % 8]} item {i}"
            writer.writerow([text, f"img/{i}.png", "ab"[(i * 7 + i // 3) % 2]])
    return folder / "table.csv"


def _peak_mb(stderr: str) -> float | None:
    for line in stderr.splitlines()[::-1]:
        if line.startswith("FUSION_ZOO_PEAK_KB"):
            return int(line.split()[1]) / 1024.0
    return None


def _fit(table: Path, cache: Path, run: Path, tokens: bool, timeout: float) -> tuple[float, float | None, str]:
    args = ["--data.data_files", str(table), "--data.cache_dir", str(cache), ENCODERS, "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(run), "--model.hidden_dim", "64"]
    if tokens:
        args += ["--model.fuse_tokens", "true", "--model.fusion_head", "cross_attention"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FIT_PEAK_CODE, *args], cwd=str(run.parent), env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fit on {table} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return seconds, _peak_mb(proc.stderr), proc.stderr


def scale_rss(tokens: bool = False, sizes: tuple[int, int] = SIZES, timeout: float = 900.0,
              keep: Path | None = None) -> dict[str, Any]:
    """Peak RSS of a cold 1-epoch fit at two sizes; the slope in MB per 100k rows."""
    key = "scale_rss_mb_per_100k_rows" + ("_tokens" if tokens else "")
    with tempfile.TemporaryDirectory(prefix="fz-scale-") as tmp:
        root = keep or Path(tmp)
        per: dict[int, dict[str, float | None]] = {}
        for n in sizes:
            folder = root / f"rows-{n}"
            table = folder / "table.csv" if (folder / "table.csv").is_file() else write_table(folder, n)
            cache = folder / ("cache-tokens" if tokens else "cache-pooled")
            seconds, peak, _ = _fit(table, cache, folder / "run", tokens, timeout)
            per[n] = {"seconds": round(seconds, 1), "peak_mb": peak}
        lo, hi = sizes
        p_lo, p_hi = per[lo]["peak_mb"], per[hi]["peak_mb"]
        slope = (p_hi - p_lo) / (hi - lo) * 100_000 if p_lo is not None and p_hi is not None else None
    return {key: slope, "per_size": per, "setup": f"tiny-text + pixels, 1 epoch, cold cache, "
            f"{'token features, cross_attention' if tokens else 'pooled features, concat'}, sizes {lo} and {hi}"}


def warm_rowcheck(n: int = SIZES[1], keep: Path | None = None) -> dict[str, Any]:
    """Seconds per 100k rows of the training split's row checks when every file was checked before."""
    from encoders import create_encoder
    from recipes.data import FusionDataModule
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    with tempfile.TemporaryDirectory(prefix="fz-rowcheck-") as tmp:
        folder = (keep or Path(tmp)) / f"rows-{n}"
        table = folder / "table.csv" if (folder / "table.csv").is_file() else write_table(folder, n)
        cfg = FusionModelConfig(encoders={"text": "tiny-text", "image": "pixels"}, labels=("a", "b"))
        model = FusionModel(cfg, encoders={"text": create_encoder("tiny-text"), "image": create_encoder("pixels")})
        dm = FusionDataModule(data_files=str(table), cache_dir=str(folder / "cache-rowcheck"))
        start = time.perf_counter()
        dm._check("train", model)  # cold: every image opened once
        cold = time.perf_counter() - start
        warm_dm = FusionDataModule(data_files=str(table), cache_dir=str(folder / "cache-rowcheck"))
        rows = len(warm_dm._parts["train"][0])
        start = time.perf_counter()
        warm_dm._check("train", model)  # a new run: the stored checks, no image opened
        warm = time.perf_counter() - start
    return {"scale_warm_rowcheck_seconds_per_100k": warm / rows * 100_000,
            "cold_rowcheck_seconds_per_100k": cold / rows * 100_000, "rows": rows}
