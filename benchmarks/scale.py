"""Memory and row-check time as the table grows (issue 31): the steps ``scale_pooled``, ``scale_tokens`` and
``scale_rowcheck`` of ``benchmarks/run.py`` (optional: ``--only scale_pooled,...``).

A table of unique short texts and unique 16 x 16 PNGs is written for each size; ``fusion-zoo fit`` (``tiny-text`` +
``pixels``, 1 epoch) runs on it in a fresh subprocess with its own feature cache, empty (encoding included). The
least-squares slope of the job's peak RSS over the sizes, per 100k rows, is what grows with the data; the constant
part (Python, torch, Lightning) and the bounded buffers (one shard while encoding, one chunk of the standardisation)
cancel once every size is past them. ``scale_rowcheck`` times the row checks of a 100k-row table's training split
again, warm (every file checked before), per 100k rows.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
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

__all__ = ["write_table", "scale_rss", "warm_rowcheck", "ddp_encode_share", "SIZES"]

# rows; the slope of peak RSS over them (least squares) is reported per 100k rows. The span is 50k-400k;
# 400k rows encode for ~25 min on 2 shared cores, so the default stops at 200k (--only scale_pooled with
# FUSION_ZOO_SCALE_SIZES=50000,100000,200000,400000 measures the whole span)
SIZES = (50_000, 200_000)
SIZES_ENV = "FUSION_ZOO_SCALE_SIZES"
TABLES_ENV = "FUSION_ZOO_SCALE_TABLES"  # a folder that keeps the generated tables between runs (default: a temp one)
ENCODERS = "--model.encoders={text: tiny-text, image: pixels}"


def _sizes() -> tuple[int, ...]:
    given = os.environ.get(SIZES_ENV)
    return tuple(sorted(int(x) for x in given.split(","))) if given else SIZES


def slope_per_100k(per: dict[int, float]) -> float:
    """Least-squares slope of peak MB over rows, per 100k rows (two sizes: the slope between them)."""
    rows = np.array(sorted(per), dtype=float)
    peaks = np.array([per[int(n)] for n in rows])
    return float(np.polyfit(rows, peaks, 1)[0] * 100_000)


def write_table(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of a unique short text, a unique 16 x 16 grey PNG and a label a/b; returns the CSV's path.

    Tables of several sizes share one image folder (``table-<n>.csv`` lists the first ``n`` images), so only the
    images a larger table adds are written.
    """
    from PIL import Image

    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if not (img / f"{i}.png").is_file():  # image i is drawn from its own seed: the same in every table
            pixels = np.random.default_rng([seed, i]).integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(img / f"{i}.png")
    words = ["red", "blue", "small", "large", "round", "flat", "old", "new"]
    path = folder / f"table-{n}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "image", "label"])
        for i in range(n):
            text = f"{words[i % 8]} {words[(i // 8) % 8]} item {i}"
            writer.writerow([text, f"img/{i}.png", "ab"[(i * 7 + i // 3) % 2]])
    return path


def _peak_mb(stderr: str) -> float | None:
    for line in stderr.splitlines()[::-1]:
        if line.startswith("FUSION_ZOO_PEAK_KB"):
            return int(line.split()[1]) / 1024.0
    return None


def _fit(table: Path, cache: Path, run: Path, tokens: bool, timeout: float,
         stream: bool = False) -> tuple[float, float | None, str]:
    args = ["--data.data_files", str(table), "--data.cache_dir", str(cache), ENCODERS, "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(run), "--model.hidden_dim", "64"]
    if tokens:
        args += ["--model.fuse_tokens", "true", "--model.fusion_head", "cross_attention"]
    if stream:
        args += ["--data.streaming", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FIT_PEAK_CODE, *args], cwd=str(run.parent), env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fit on {table} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return seconds, _peak_mb(proc.stderr), proc.stderr


def _tables_root(tmp: str, keep: Path | None) -> Path:
    given = os.environ.get(TABLES_ENV)
    return keep or (Path(given) if given else Path(tmp))


def scale_rss(tokens: bool = False, sizes: tuple[int, ...] | None = None, timeout: float = 7200.0,
              keep: Path | None = None, stream: bool = False) -> dict[str, Any]:
    """Peak RSS of a cold 1-epoch fit at each size; the least-squares slope in MB per 100k rows.

    ``stream``: the fit reads the table with ``--data.streaming`` (no feature cache, encoders every step), whose
    memory should not grow with the table at all.
    """
    key = "scale_rss_mb_per_100k_rows" + ("_tokens" if tokens else "") + ("_stream" if stream else "")
    mode = "stream" if stream else ("tokens" if tokens else "pooled")
    sizes = tuple(sorted(sizes or _sizes()))
    with tempfile.TemporaryDirectory(prefix="fz-scale-") as tmp:
        root = _tables_root(tmp, keep)
        per: dict[int, dict[str, float | None]] = {}
        for n in sizes:
            table = root / f"table-{n}.csv"
            table = table if table.is_file() else write_table(root, n)
            cache, run = root / f"cache-{n}-{mode}", root / f"run-{n}-{mode}"
            for old in (cache, run):  # cold: encoding included, and a new run folder
                shutil.rmtree(old, ignore_errors=True)
            try:
                seconds, peak, _ = _fit(table, cache, run, tokens, timeout, stream)
            finally:
                shutil.rmtree(cache, ignore_errors=True)  # GBs at 400k rows; the tables are what is worth keeping
            per[n] = {"seconds": round(seconds, 1), "peak_mb": peak}
        peaks = {n: p["peak_mb"] for n, p in per.items() if p["peak_mb"] is not None}
        slope = slope_per_100k(peaks) if len(peaks) == len(sizes) >= 2 else None
    kind = {"stream": "streamed table (--data.streaming, no cache), concat", "tokens": "token features, "
            "cross_attention", "pooled": "pooled features, concat"}[mode]
    return {key: slope, "per_size": per, "setup": f"tiny-text + pixels, 1 epoch, cold cache, {kind}, sizes "
            f"{', '.join(str(n) for n in sizes)} (least-squares slope)"}


def warm_rowcheck(n: int = 100_000, keep: Path | None = None) -> dict[str, Any]:
    """Seconds per 100k rows of the training split's row checks when every file was checked before."""
    from encoders import create_encoder
    from recipes.data import FusionDataModule
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    with tempfile.TemporaryDirectory(prefix="fz-rowcheck-") as tmp:
        folder = _tables_root(tmp, keep)
        table = folder / f"table-{n}.csv"
        table = table if table.is_file() else write_table(folder, n)
        shutil.rmtree(folder / "cache-rowcheck", ignore_errors=True)
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


def ddp_encode_share(n: int = 4_000, timeout: float = 1200.0, keep: Path | None = None) -> dict[str, Any]:
    """The largest fraction of a split's distinct inputs that one process encodes when two processes (two "nodes"
    of one process, gloo on 127.0.0.1, started by hand as on two machines) fit on an empty shared cache."""
    with tempfile.TemporaryDirectory(prefix="fz-ddp-") as tmp:
        root = _tables_root(tmp, keep)
        table = root / f"table-{n}.csv"
        table = table if table.is_file() else write_table(root, n)
        cache, run = root / "cache-ddp", root / "run-ddp"
        for old in (cache, run):
            shutil.rmtree(old, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        args = [sys.executable, "-m", "recipes.cli", "fit", "--data.data_files", str(table), "--data.cache_dir",
                str(cache), ENCODERS, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run),
                "--model.hidden_dim", "64", "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2",
                "--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false"]
        start = time.perf_counter()
        procs = [subprocess.Popen(args, cwd=str(root), env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for node in (0, 1)]
        outs = [p.communicate(timeout=timeout) for p in procs]
        seconds = time.perf_counter() - start
        for p, (_, err) in zip(procs, outs, strict=True):
            if p.returncode != 0:
                raise RuntimeError(f"two-process fit failed:\n{err[-2000:]}")
        entries = [json.loads((e / "meta.json").read_text()) for e in sorted(cache.glob("*.features"))]
        shutil.rmtree(cache, ignore_errors=True)
    shares = {f"{m['key_parts']['column']}/{m['distinct']}": max(m["encoded_by_process"]) / max(1, m["distinct"])
              for m in entries}
    return {"ddp_encode_share": max(shares.values()), "per_entry": shares, "seconds": round(seconds, 1),
            "setup": f"{n} rows, tiny-text + pixels, 2 processes (2 nodes x 1, gloo on 127.0.0.1), empty cache"}
