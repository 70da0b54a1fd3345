"""The measurements behind benchmarks/run.py; each returns a dict of results (target keys) and details."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FIT_PEAK_CODE", "inference_fusion", "head_step_share", "pipeline_headroom", "sweep_cache_speedup",
           "best_time", "cache_encode_speedup", "cached_step_overhead", "cli_startup_seconds"]

# `python -c FIT_PEAK_CODE ARGS...` runs `fusion-zoo fit ARGS...` and prints its own peak RSS (VmHWM) as
# FUSION_ZOO_PEAK_KB on stderr: ru_maxrss of a child forked from a large process inherits the parent's peak across
# exec on Linux, which once reported 6.4 GB for a job that peaked at 3.0 GB.
FIT_PEAK_CODE = """import atexit, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            print('FUSION_ZOO_PEAK_KB', line.split()[1], file=sys.stderr)
atexit.register(_peak)
from recipes.cli import main
sys.exit(main(['fit'] + sys.argv[1:]))
"""

BATCH = 32


def best_time(fn: Callable[[], Any], reps: int = 5, warmup: int = 2) -> float:
    """Best (minimum) wall seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls.

    The minimum, not the mean: on a shared machine other processes only ever add time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_times(fns: dict[str, Callable[[], Any]], reps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Best wall seconds of each of several ``fns``, timed in turns (a, b, a, b, ...) after ``warmup`` calls each.

    In turns, not one after the other: a burst of load from another process then slows every setup alike instead
    of only the one timed during it, so a ratio of two best times stays honest on a shared machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _rows(split: str, n: int) -> list[dict[str, Any]]:
    from recipes.tridigits.dataset import load_tridigits

    ds = load_tridigits(split)
    return [ds[i] for i in range(min(n, len(ds)))]


def _raw(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Raw model inputs from dataset rows (datasets has already decoded the image column to PIL)."""
    return {"audio": [r["audio"] for r in rows], "image": [r["image"] for r in rows], "text": [r["text"] for r in rows]}


def _default_model(stage: str = "late", head: str = "concat") -> Any:
    from recipes.task import DEFAULT_ENCODERS
    from recipes.tridigits.dataset import TRIDIGITS_LABELS
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    cfg = FusionModelConfig(encoders=dict(DEFAULT_ENCODERS), labels=tuple(TRIDIGITS_LABELS), fusion_head=head,
                            stage=stage)
    return FusionModel(cfg)


def inference_fusion() -> dict[str, Any]:
    """Image encoder throughput on CPU: eager vs BatchNorm-folded (and + channels_last, + torch.compile)."""
    from encoders import create_encoder
    from zoo.optimize import example_image_batch, fuse_for_inference

    enc = create_encoder("efficientnet-lite0")
    batch = example_image_batch(enc, batch_size=8)

    def run(model: Any) -> Callable[[], Any]:
        return lambda: model(batch)

    variants: dict[str, Any] = {"eager": enc, "bn_fold_only": fuse_for_inference(enc, channels_last=False),
                                "fused": fuse_for_inference(enc)}
    t = time.perf_counter()
    variants["fused+compile"] = fuse_for_inference(enc, compile=True)
    with torch.no_grad():
        ref = enc(batch)
        variants["fused+compile"](batch)  # compiles
    compile_s = time.perf_counter() - t
    times: dict[str, float] = {}
    diffs: dict[str, float] = {}
    with torch.no_grad():
        for name, model in variants.items():
            times[name] = best_time(run(model), reps=7)
            out = model(batch)
            diffs[name] = max(float((out.tokens - ref.tokens).abs().max()),
                              float((out.pooled - ref.pooled).abs().max()))
    eager_again = best_time(lambda: enc(batch), reps=7)  # guard against drift in machine load
    eager = min(times["eager"], eager_again)
    best = min(("fused", "fused+compile"), key=times.__getitem__)
    return {
        "inference_fused_speedup": eager / times[best],
        "inference_max_abs_diff": diffs[best],
        "best_variant": best,
        "images_per_s": {n: 8 / t for n, t in times.items()},
        "max_abs_diff": diffs,
        "speedup_bn_fold_only": eager / times["bn_fold_only"],
        "speedup_fused_no_compile": eager / times["fused"],
        "compile_seconds": compile_s,
        "batch": "8 images, 224 px, efficientnet-lite0",
    }


def _train_step_parts(model: Any, raw: dict[str, list[Any]], labels: torch.Tensor) -> dict[str, float]:
    """Seconds per training step in the frozen encoders and in the head side (forward + backward + AdamW)."""
    batch = model.preprocess(**raw)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        feats = model.encode(batch)

    def enc() -> None:
        with torch.no_grad():
            model.encode(batch)

    def head() -> None:
        out = model.fuse(feats)
        loss = F.cross_entropy(out.logits, labels) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"encoders_s": best_time(enc, reps=5), "head_s": best_time(head, reps=20, warmup=3)}


def head_step_share() -> dict[str, Any]:
    """Share of a training step (default recipe: late concat, frozen pretrained encoders) spent in the head side."""
    rows = _rows("train", BATCH)
    model = _default_model()
    labels = torch.tensor([r["label"] for r in rows])
    parts = _train_step_parts(model, _raw(rows), labels)
    step = parts["encoders_s"] + parts["head_s"]
    return {"head_step_share": parts["head_s"] / step, **parts, "step_samples_per_s": BATCH / step,
            "batch": BATCH}


def pipeline_headroom() -> dict[str, Any]:
    """Samples/s of decode + preprocess (all three modalities) vs samples/s a training step consumes."""
    from recipes.tridigits.dataset import load_tridigits

    model = _default_model()
    ds = load_tridigits("train")
    n = min(4 * BATCH, len(ds))

    def pipeline() -> None:
        for start in range(0, n, BATCH):
            rows = ds[start:start + BATCH]  # decodes the images (PIL) from parquet bytes
            model.preprocess(audio=rows["audio"], image=rows["image"], text=rows["text"])  # audio decoded here

    pre_s = best_time(pipeline, reps=3, warmup=1)
    rows = _rows("train", BATCH)
    parts = _train_step_parts(model, _raw(rows), torch.tensor([r["label"] for r in rows]))
    step_rate = BATCH / (parts["encoders_s"] + parts["head_s"])
    pipe_rate = n / pre_s
    return {"pipeline_headroom": pipe_rate / step_rate, "pipeline_samples_per_s": pipe_rate,
            "train_step_samples_per_s": step_rate, "note": "one process; DataLoader workers multiply the supply"}


def sweep_cache_speedup(n: int = 256, batch: int = 16, heads: tuple[str, ...] = ("concat", "gating")) -> dict[str, Any]:
    """A small sweep (``heads`` × late × 1 seed, one epoch over ``n`` samples) over cached features vs the same
    sweep re-encoding every step with the frozen encoders; also checks both reach the same losses."""
    import tempfile
    from pathlib import Path

    from recipes.cache import FeatureCache
    from recipes.tridigits.dataset import load_tridigits

    rows = load_tridigits("train").select(range(n))
    labels = torch.tensor(rows["label"])
    model = _default_model().eval()
    pre = model.preprocess(audio=rows["audio"], image=rows["image"], text=rows["text"])
    cache = FeatureCache(Path(tempfile.mkdtemp(prefix="fz-bench-cache-")), memory=False)

    def from_cache() -> dict[str, Any]:
        return {m: cache.get_or_compute(enc, rows, m, "train", store_tokens=False) for m, enc in
                model.encoders.items()}

    t = time.perf_counter()
    from_cache()  # the first sweep fills the cache
    build_s = time.perf_counter() - t

    def cell(head: str, feats_for: Callable[[torch.Tensor], dict[str, Any]]) -> float:
        torch.manual_seed(0)
        m = _head_only(model, head)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for start in range(0, n, batch):
            idx = torch.arange(start, min(n, start + batch))
            out = m.fuse(feats_for(idx))
            loss = F.cross_entropy(out.logits, labels[idx]) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(F.cross_entropy(m.eval().fuse(feats_for(torch.arange(n))).logits, labels))

    def encoded(idx: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            return model.encode({m: {k: v[idx] for k, v in b.items()} for m, b in pre.items()})

    t = time.perf_counter()
    slow = {h: cell(h, encoded) for h in heads}
    slow_s = time.perf_counter() - t
    t = time.perf_counter()  # a later sweep: read the cache, then train
    cached = from_cache()  # read from disk (memory index off), as a later sweep process would
    lookup_s = time.perf_counter() - t
    assert all(stats.hit for _, stats in cached.values())
    fast = {h: cell(h, lambda idx: {m: f.index(idx) for m, (f, _) in cached.items()}) for h in heads}
    fast_s = time.perf_counter() - t
    fresh = encoded(torch.arange(n))
    return {"sweep_cache_speedup": slow_s / fast_s, "reencode_seconds": slow_s, "cached_seconds": fast_s,
            "cache_build_seconds": build_s, "cache_lookup_seconds": lookup_s,
            "final_loss_reencode": slow, "final_loss_cached": fast,
            "max_loss_diff": max(abs(slow[h] - fast[h]) for h in heads),
            "max_feature_diff": max(float((fresh[m].pooled - f.pooled).abs().max()) for m, (f, _) in cached.items()),
            "setup": f"{len(heads)} heads x late x 1 seed, {n} samples, batch {batch}, 1 epoch; cached time "
                     "includes reading the cache"}


def _head_only(model: Any, head: str) -> Any:
    from zoo.model import FusionModel

    return FusionModel(model.config.replace(fusion_head=head), embed_dims=model.embed_dims).train()


def partial_finetune_overhead(n: int = 192, batch: int = 32,
                              image_encoder: str = "efficientnet-lite0") -> dict[str, Any]:
    """Epoch time fine-tuning one encoder with the other two frozen, over the epoch time of that encoder alone.

    Both models train the same image encoder (``last_n=1``) on the same ``n`` tridigits rows through
    ``FusionDataModule``; the frozen text and audio encoders' features come from the per-modality cache (filled
    before timing), so the ratio shows what they still cost per step: slicing cached rows, not running encoders.
    """
    import tempfile

    from recipes.data import FusionDataModule
    from recipes.tridigits.dataset import TRIDIGITS_LABELS
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    image = {"name": image_encoder, "finetune": "last_n", "last_n": 1}
    layouts = {"alone": {"image": image},
               "with_frozen": {"image": image, "text": "minilm-l6", "audio": "whisper-base"}}
    epochs: dict[str, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory(prefix="fz-partial-") as cache:
        for name, encoders in layouts.items():
            torch.manual_seed(0)
            cfg = FusionModelConfig(encoders=encoders, labels=tuple(TRIDIGITS_LABELS), stage="early",
                                    fuse_tokens=False)
            model = FusionModel(cfg)
            dm = FusionDataModule(dataset="tridigits", max_samples=n, batch_size=batch, cache_dir=cache).attach(model)
            dm.setup("fit")  # encodes the frozen modalities once (not timed)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            model.train()

            def epoch(model: Any = model, dm: Any = dm, opt: Any = opt) -> None:
                for b in dm.train_dataloader():
                    loss = torch.nn.functional.cross_entropy(model(b["inputs"]).logits, b["labels"])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

            epochs[name] = epoch
        seconds = best_times(epochs, reps=3, warmup=1)  # in turns: load bursts hit both layouts alike
    return {"partial_finetune_overhead": seconds["with_frozen"] / seconds["alone"],
            "partial_finetune_epoch_seconds": seconds, "partial_finetune_rows": n}


def _easyvqa_images(n: int) -> Any:
    """The first ``n`` distinct easy-VQA image files (sorted paths) as a one-column dataset, or None when the data
    is not prepared (``python benchmarks/easyvqa.py prepare``)."""
    import datasets

    from benchmarks.easyvqa import DEFAULT_DIR

    files = sorted(str(p) for p in (DEFAULT_DIR / "images").rglob("*.png"))[:n]
    return datasets.Dataset.from_dict({"image": files}) if len(files) == n else None


def _misses(enc: Any, rows: Any, variants: dict[str, tuple[bool, bool, bool, int | None]], reps: int,
            batch_size: int, detail: set[str], detail_reps: int
            ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, str]]:
    """Seconds of every round, features and cache keys of feature-cache misses on ``rows`` per variant (name ->
    (fold, chunked, graph, chunk workers)), the variants in turns so a burst of load hits all; ``detail`` ones run
    ``detail_reps`` times."""
    import shutil
    import tempfile
    from pathlib import Path

    import recipes.chunks as chunks
    from recipes.cache import FeatureCache

    times: dict[str, list[float]] = {}
    feats: dict[str, Any] = {}
    keys: dict[str, str] = {}
    chunk_pixels, chunk_workers = chunks.CHUNK_PIXELS, chunks.CHUNK_WORKERS
    for rep in range(reps):
        for name, (fold, chunked, graph, workers) in variants.items():
            if name in detail and rep >= detail_reps:
                continue
            root = Path(tempfile.mkdtemp(prefix="fz-bench-encode-"))
            chunks.CHUNK_PIXELS = chunk_pixels if chunked else 1 << 62
            chunks.CHUNK_WORKERS = workers
            try:
                cache = FeatureCache(root, memory=False, fold=fold, graph=graph)
                t = time.perf_counter()
                out, stats = cache.get_or_compute(enc, rows, "image", "train", store_tokens=False,
                                                  batch_size=batch_size)
                times.setdefault(name, []).append(time.perf_counter() - t)
                feats[name], keys[name] = out, stats.key
            finally:
                chunks.CHUNK_PIXELS, chunks.CHUNK_WORKERS = chunk_pixels, chunk_workers
                shutil.rmtree(root, ignore_errors=True)
    return times, feats, keys


def cache_encode_speedup(n: int = 512, batch_size: int = 64, reps: int = 6, detail_reps: int = 2,
                         real_reps: int = 3) -> dict[str, Any]:
    """The feature cache encoding the same ``n`` tridigits images (efficientnet-lite0, frozen) on a miss, with and
    without folding (``FeatureCache(fold=...)``: BatchNorm folded, channels-last, ``zoo.optimize.inference_copy``),
    in one process; each timing is the best of ``reps`` misses into fresh cache folders, fold time included (the
    paths in turns, so a burst of load on this shared machine hits both; the details' variants run
    ``detail_reps`` times).

    Both paths run CPU image batches in cache-sized chunks (``zoo.chunks.CHUNK_PIXELS``), side by side on one
    worker thread per intra-op thread (``zoo.chunks.CHUNK_WORKERS``); the details also time both paths with the
    chunks one after another on all threads, the plain path on whole batches (what the cache did before chunking)
    for the overall gain, and, when easy-VQA is prepared, the same two paths on ``n`` of its images (real RGB
    data: the speedup and the largest feature difference that the 1e-4 promise is about), best of ``real_reps``."""
    from encoders import create_encoder
    from recipes.chunks import chunk_workers, cpu_chunk_size
    from recipes.tridigits.dataset import load_tridigits

    rows = load_tridigits("train").select(range(n)).select_columns(["image"])
    enc = create_encoder("efficientnet-lite0", finetune="frozen").eval()
    variants: dict[str, tuple[bool, bool, bool, int | None]] = {
        "plain": (False, True, False, None), "folded": (True, True, False, None),
        "folded_graph": (True, True, True, None), "plain_whole_batches": (False, False, False, 1),
        "plain_one_worker": (False, True, False, 1), "folded_one_worker": (True, True, False, 1)}
    detail = {"folded_graph", "plain_whole_batches", "plain_one_worker", "folded_one_worker"}
    rounds, feats, keys = _misses(enc, rows, variants, reps, batch_size, detail, detail_reps)
    times = {k: min(v) for k, v in rounds.items()}
    # the same comparison per round (plain and folded run back to back): how far one lucky or unlucky window of
    # this shared machine moves the ratio of the bests
    round_ratios = [p / f for p, f in zip(rounds["plain"], rounds["folded"], strict=True)]

    def diff(a: str, b: str, f: dict[str, Any] = feats) -> float:
        return float((f[a].pooled - f[b].pooled).abs().max())

    real = _easyvqa_images(n)
    easyvqa: dict[str, Any] = {"skipped": "easy-VQA not prepared: python benchmarks/easyvqa.py prepare"}
    if real is not None:
        real_rounds, rf, _ = _misses(enc, real, {k: variants[k] for k in ("plain", "folded")}, real_reps,
                                     batch_size, set(), 0)
        rt = {k: min(v) for k, v in real_rounds.items()}
        easyvqa = {"speedup": rt["plain"] / rt["folded"], "max_abs_diff": diff("folded", "plain", rf),
                   "max_abs_feature": float(rf["plain"].pooled.abs().max()),
                   "images_per_s": {k: n / v for k, v in rt.items()},
                   "setup": f"the first {n} easy-VQA image files (sorted), best of {real_reps}"}
    chunk = cpu_chunk_size({"pixel_values": torch.zeros(batch_size, 3, 224, 224)}, "cpu")
    with torch.no_grad():  # as the cache runs them
        workers = chunk_workers(-(-batch_size // (chunk or batch_size)))
    return {
        "cache_encode_speedup": times["plain"] / times["folded"],
        "cache_encode_max_abs_diff": diff("folded", "plain"),
        "cache_encode_round_ratios": round_ratios,
        "cache_encode_median_round_ratio": float(statistics.median(round_ratios)),
        "cache_encode_vs_whole_batch_plain": times["plain_whole_batches"] / times["folded"],
        # both paths with their chunks one after another on all threads (zoo.chunks.CHUNK_WORKERS = 1)
        "cache_encode_one_worker_speedup": times["plain_one_worker"] / times["folded_one_worker"],
        # opt-in FeatureCache(graph=True) (zoo.graph.GraphEncode)
        "cache_encode_graph_speedup": times["plain"] / times["folded_graph"],
        "cache_encode_graph_max_abs_diff": diff("folded_graph", "plain"),
        "images_per_s": {k: n / v for k, v in times.items()},
        "keys_differ": keys["plain"] != keys["folded"],
        "easyvqa": easyvqa,
        "setup": f"{n} tridigits train images, efficientnet-lite0 (224 px), batch {batch_size} in chunks of "
                 f"{chunk} on {workers} worker threads, "
                 f"{torch.get_num_threads()} threads, best of {reps} (details: of {detail_reps})",
    }


def cached_step_overhead(n: int = 7000, batch: int = 128, epochs: int = 4, rounds: int = 2) -> dict[str, Any]:
    """Mean training step of ``fusion-zoo fit`` on cached features / a plain PyTorch step of the same step.

    Both train the default head (a head-only ``FusionModel`` of the default config) on features shaped like
    easy-VQA's default ones (image 2048 + text 384 wide, 13 classes, ``n`` rows) with the same batch, AdamW
    (fused), gradient clipping at 1 and warm-up/cosine schedule stepped every batch. The fit side is the
    Trainer ``fusion-zoo fit`` builds (CSV logger, progress bar, learning-rate monitor, checkpoint callbacks,
    the data module's index-slice batches); validation is off so an epoch's time is its steps. The plain side
    slices the same tensors in a bare loop. Mean step = epoch seconds / steps, best epoch after the first.
    """
    import tempfile

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from encoders import ModalityOutput
    from recipes.batches import FeatureBatches
    from recipes.callbacks import FusionCheckpoint, ResumeCallback
    from recipes.settings import OptimConfig
    from recipes.sweep.train import CachedFeatureTask
    from recipes.task import warmup_cosine
    from zoo.config import FusionModelConfig

    g = torch.Generator().manual_seed(0)
    dims = {"image": 2048, "text": 384}
    pooled = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    feats = {m: ModalityOutput(p[:, None], torch.ones(n, 1, dtype=torch.bool), p) for m, p in pooled.items()}
    labels = torch.randint(0, 13, (n,), generator=g)
    cfg = FusionModelConfig(encoders={"image": "efficientnet-lite0-pixels", "text": "minilm-l6"},
                            labels=tuple(str(i) for i in range(13)))
    steps = -(-n // batch)

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.times.append(time.perf_counter() - self.t)

    def fit_step() -> float:
        torch.manual_seed(0)
        task = CachedFeatureTask(cfg.to_dict(), dims, OptimConfig())
        task.model.fit_feature_norm(feats)
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, gradient_clip_val=1.0,
                                 log_every_n_steps=5, logger=CSVLogger(tmp, name="", version=""),
                                 callbacks=[LearningRateMonitor(logging_interval="step"), timer, ResumeCallback(),
                                            FusionCheckpoint(dirpath=tmp, monitor="train/loss", save_last=True)],
                                 enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                                 default_root_dir=tmp)
            trainer.fit(task, train_dataloaders=FeatureBatches(feats, labels, batch_size=batch, shuffle=True,
                                                               tokens=False))
        return min(timer.times[1:]) / steps

    def plain_step() -> float:
        torch.manual_seed(0)
        task = CachedFeatureTask(cfg.to_dict(), dims, OptimConfig())
        model = task.model
        model.fit_feature_norm(feats)
        model.train()
        opt = torch.optim.AdamW(task.param_groups(), fused=True)
        total = epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, total // 20))
        times = []
        for _ in range(epochs):
            t = time.perf_counter()
            for idx in torch.randperm(n).split(batch):
                inputs = {m: ModalityOutput(p[idx][:, None], torch.ones(idx.numel(), 1, dtype=torch.bool), p[idx])
                          for m, p in pooled.items()}
                out = model.fuse(inputs)
                loss = F.cross_entropy(out.logits, labels[idx]) + out.aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            times.append(time.perf_counter() - t)
        return min(times[1:]) / steps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what fit's CachedFeatureThreads gives a head-only step, on both sides
    fit_s, plain_s = [], []
    for _ in range(rounds):  # in turns: a burst of load slows both alike
        plain_s.append(plain_step())
        fit_s.append(fit_step())
    torch.set_num_threads(threads)
    return {"cached_step_overhead": min(fit_s) / min(plain_s), "fit_step_ms": 1000 * min(fit_s),
            "plain_step_ms": 1000 * min(plain_s), "fit_step_ms_rounds": [1000 * x for x in fit_s],
            "plain_step_ms_rounds": [1000 * x for x in plain_s], "batch": batch, "rows": n,
            "features": "image 2048 + text 384 (easy-VQA default widths), 13 classes", "threads": 1}


def cli_startup_seconds(reps: int = 3) -> dict[str, Any]:
    """Wall seconds of ``fusion-zoo --help``, ``fusion-zoo zoo list`` and ``fusion-zoo predict --help`` in fresh
    processes (best of ``reps`` each); the figure is the slowest of the three."""
    import os
    import subprocess
    import sys

    commands = {"--help": ["--help"], "zoo list": ["zoo", "list"], "predict --help": ["predict", "--help"]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    best = {}
    for name, args in commands.items():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "recipes.cli", *args], env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    return {"cli_startup_seconds": max(best.values()), "cli_startup_by_command": best}
