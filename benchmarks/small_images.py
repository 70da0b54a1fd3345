"""Image-alone accuracy on small, degraded images (issue 10 item 4): ``python benchmarks/small_images.py``.

Two image sets, both built offline and seeded (nothing is written to the repository):

* ``digits-hard``: scikit-learn's 1,797 real handwritten 8x8 digits, heavily degraded at 28x28 grayscale (random
  scale, rotation and shift, blur, low contrast on a random background, strong noise, a hidden stripe), a seeded
  60/20/20 train/validation/test split. A harder stand-in for "small noisy grayscale digits" than tridigits.
* ``easyvqa-shape`` / ``easyvqa-color``: easy-VQA's 64x64 colour shape images (``pip install easy-vqa``), labelled
  per image with the answer to its "what shape / what color" question: normal, clean images.

For every encoder the features of each split are computed once (``OMP_NUM_THREADS=1``, timed per 1,000 images) and
a standardised logistic regression (C picked on validation) is fitted on train; test accuracy is reported. The
trainable ``small-cnn`` is trained on the image alone (early stopping on validation). ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["degrade_digit", "digits_hard", "easyvqa_images", "probe_accuracy", "main"]

Split = tuple[list[Any], np.ndarray]  # (images, labels)


def degrade_digit(img8: np.ndarray, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """One 8x8 digit (0..16) → a heavily degraded ``size`` x ``size`` uint8 grayscale image."""
    from PIL import Image, ImageFilter

    glyph = Image.fromarray((img8 * (255 / 16)).astype(np.uint8))
    side = int(rng.integers(int(size * 0.6), int(size * 0.8) + 1))  # random scale
    glyph = glyph.resize((side, side), Image.Resampling.BICUBIC).rotate(
        float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR, expand=True)
    canvas = np.zeros((size + 2 * side, size + 2 * side), np.float32)  # paste at a random shift, then crop
    cx = side + (size - glyph.width) // 2 + int(rng.integers(-size // 10, size // 10 + 1))
    cy = side + (size - glyph.height) // 2 + int(rng.integers(-size // 10, size // 10 + 1))
    canvas[cy:cy + glyph.height, cx:cx + glyph.width] = np.asarray(glyph, np.float32) / 255
    x = canvas[side:side + size, side:side + size]  # [S, S] 0..1
    x = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5)))), np.float32) / 255
    background, contrast = rng.uniform(0.1, 0.5), rng.uniform(0.25, 0.5)  # low contrast on a random grey
    x = background + contrast * x
    if rng.random() < 0.5:  # a hidden stripe (occlusion) from a random side
        cut = int(rng.integers(size // 8, size // 4))
        x[[np.s_[:cut], np.s_[-cut:], np.s_[:, :cut], np.s_[:, -cut:]][int(rng.integers(4))]] = background
    x = x + rng.normal(0, rng.uniform(0.08, 0.16), x.shape)  # strong noise
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def digits_hard(seed: int = 0, size: int = 28) -> dict[str, Split]:
    """scikit-learn digits, degraded by :func:`degrade_digit`, split 60/20/20 (seeded, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    rng = np.random.default_rng(seed)
    images = [degrade_digit(im, rng, size) for im in d.images]
    idx = np.arange(len(images))
    tr, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=d.target)
    va, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=d.target[rest])
    return {name: ([images[i] for i in ids], d.target[ids]) for name, ids in (("train", tr), ("validation", va),
                                                                               ("test", te))}


def easyvqa_images(task: str, n_train: int = 1000, n_test: int = 500, seed: int = 0) -> dict[str, Split]:
    """easy-VQA images labelled by ``shape`` or ``color`` (the answers to their "what shape / what color" questions).

    The same seeded images for both tasks (those with both answers): a subset of train (80/20 train/validation)
    and of test.
    """
    import easy_vqa
    from PIL import Image

    names = {"shape": {"circle", "rectangle", "triangle"},
             "color": {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}}
    rng = np.random.default_rng(seed)
    out: dict[str, Split] = {}
    for split, questions, paths, n in (("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(),
                                        n_train),
                                       ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(),
                                        n_test)):
        label: dict[str, dict[int, str]] = {"shape": {}, "color": {}}
        for q, a, i in zip(*questions, strict=True):
            for kind, answers in names.items():
                if a in answers and q.startswith("what"):
                    label[kind][i] = a
        ids = sorted(set(label["shape"]) & set(label["color"]))
        ids = [ids[j] for j in rng.permutation(len(ids))[:n]]
        imgs = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids]
        out[split] = (imgs, np.array([label[task][i] for i in ids]))
    k = int(0.8 * len(out["train"][0]))
    (imgs, y) = out["train"]
    out["train"], out["validation"] = (imgs[:k], y[:k]), (imgs[k:], y[k:])
    return out


def raw_pixels(images: list[Any]) -> np.ndarray:
    """Images as they come, flattened (the baseline: no resize, no standardisation)."""
    return np.stack([np.asarray(im, np.float32).reshape(-1) / 255 for im in images])


def probe_accuracy(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Standardised logistic regression, C picked on validation; returns val and test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats["train"])
    x = {k: scaler.transform(v) for k, v in feats.items()}
    best: tuple[float, Any] = (-1.0, None)
    for c in (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], labels["train"])
        acc = float(clf.score(x["validation"], labels["validation"]))
        if acc > best[0]:
            best = (acc, clf)
    return {"validation": best[0], "test": float(best[1].score(x["test"], labels["test"])), "C": best[1].C}


def mlp_accuracy(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int = 0) -> dict[str, float]:
    """What the fused model's image path does with pooled features (no feature scaling): Linear(D, 128) → GELU →
    dropout 0.1 → Linear(128, C), AdamW 1e-3, batches of 32, the epoch with the best validation accuracy (of 60)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    classes = sorted(set(labels["train"].tolist()))
    x = {k: torch.from_numpy(v).float() for k, v in feats.items()}
    y = {k: torch.tensor([classes.index(c) for c in v.tolist()]) for k, v in labels.items()}
    net = nn.Sequential(nn.Linear(x["train"].shape[1], 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, len(classes)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    best = (-1.0, 0.0)
    for _ in range(60):
        net.train()
        for idx in torch.randperm(len(y["train"])).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x["train"][idx]), y["train"][idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = {k: float((net(x[k]).argmax(1) == y[k]).float().mean()) for k in ("validation", "test")}
        if acc["validation"] > best[0]:
            best = (acc["validation"], acc["test"])
    return {"mlp_validation": best[0], "mlp_test": best[1]}


def train_encoder(name: str, options: dict[str, Any], images: dict[str, list[Any]], labels: dict[str, np.ndarray],
                  epochs: int = 30, seed: int = 0) -> dict[str, float]:
    """A trainable encoder (``finetune="full"``) + linear classifier trained on the image alone: AdamW 2e-3, batches
    of 64, the epoch with the best validation accuracy; CPU seconds per epoch and per 1,000 images encoded."""
    import torch
    from torch import nn

    import encoders

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    enc = encoders.create_encoder(name, finetune="full", **options)
    classes = sorted(set(labels["train"].tolist()))
    start = time.process_time()
    batches = {k: enc.preprocessor(v) for k, v in images.items()}
    prep_ms = 1000 * (time.process_time() - start) / sum(len(v) for v in images.values())
    y = {k: torch.tensor([classes.index(c) for c in v.tolist()]) for k, v in labels.items()}
    head = nn.Linear(enc.embed_dim, len(classes))
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3, weight_decay=1e-2)

    def rows(split: str, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in batches[split].items()}

    best, train_cpu, eval_ms = (-1.0, 0.0, 0), 0.0, 0.0
    for epoch in range(epochs):
        enc.train()
        start = time.process_time()
        for idx in torch.randperm(len(y["train"])).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(head(enc(rows("train", idx)).pooled), y["train"][idx]).backward()
            opt.step()
        train_cpu += time.process_time() - start
        enc.eval()
        start = time.process_time()
        with torch.no_grad():
            acc = {k: float((head(enc(batches[k]).pooled).argmax(1) == y[k]).float().mean())
                   for k in ("validation", "test")}
        eval_ms = 1000 * (time.process_time() - start) / (len(y["validation"]) + len(y["test"]))
        if acc["validation"] > best[0]:
            best = (acc["validation"], acc["test"], epoch)
    return {"validation": best[0], "test": best[1], "best_epoch": best[2], "epochs": epochs,
            "cpu_seconds_per_epoch": round(train_cpu / epochs, 2), "seconds_per_1000": round(prep_ms + eval_ms, 2)}


def encode(name: str, options: dict[str, Any], images: dict[str, list[Any]]) -> tuple[dict[str, np.ndarray], float]:
    """Frozen encoder's pooled features per split and its CPU seconds per 1,000 images (preprocessing included;
    one thread, so CPU time is what an idle core would take; wall time on a loaded machine is longer)."""
    import torch

    import encoders

    torch.set_num_threads(1)
    enc = encoders.create_encoder(name, finetune="frozen", **options)
    feats, seconds, count = {}, 0.0, 0
    for split, imgs in images.items():
        parts = []
        start = time.process_time()
        for i in range(0, len(imgs), 64):
            parts.append(enc(enc.preprocessor(imgs[i:i + 64])).pooled.numpy())
        seconds += time.process_time() - start
        count += len(imgs)
        feats[split] = np.concatenate(parts)
    return feats, 1000 * seconds / count


def features(ds: str, spec: str, images: dict[str, list[Any]], cache: Path | None) -> tuple[dict[str, np.ndarray],
                                                                                        float]:
    """``raw`` pixels or a frozen encoder's pooled features (``NAME`` or ``NAME:JSON_OPTIONS``), kept in ``cache``."""
    name, _, opts = spec.partition(":")
    if name == "raw":
        return {k: raw_pixels(v) for k, v in images.items()}, 0.0
    image_set = "easyvqa" if ds.startswith("easyvqa") else ds  # both easy-VQA tasks label the same images
    key = cache / f"{image_set}_{hashlib.sha1(spec.encode()).hexdigest()[:12]}.npz" if cache else None
    if key is not None and key.is_file():
        saved = np.load(key)
        return {k: saved[k] for k in images}, float(saved["ms"])
    feats, ms = encode(name, json.loads(opts or "{}"), images)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        np.savez(key, ms=ms, **feats)
    return feats, ms


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits-hard", "easyvqa-shape", "easyvqa-color"])
    parser.add_argument("--encoders", nargs="+", default=["raw", "efficientnet-lite0"],
                        help="'raw', NAME or NAME:JSON_OPTIONS; 'A + B' concatenates the features of A and B")
    parser.add_argument("--train", nargs="*", default=[], help="trainable encoders: NAME or NAME:JSON_OPTIONS")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1, help="MLP probes (and trainings) averaged over this many seeds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping each (dataset, encoder)'s features")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for ds in args.datasets:
        data = digits_hard() if ds == "digits-hard" else easyvqa_images(ds.split("-")[1])
        images = {k: v[0] for k, v in data.items()}
        labels = {k: v[1] for k, v in data.items()}
        for spec in args.encoders:
            parts = [features(ds, part, images, args.cache) for part in spec.split(" + ")]
            feats = {k: np.concatenate([p[0][k] for p in parts], axis=1) for k in images}
            ms = sum(p[1] for p in parts)
            res = probe_accuracy(feats, labels)
            runs = [mlp_accuracy(feats, labels, seed) for seed in range(args.seeds)]
            res.update({k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
                       mlp_test_runs=[r["mlp_test"] for r in runs])
            res.update(seconds_per_1000=round(ms, 2), dim=int(feats["train"].shape[1]))
            results[f"{ds} | {spec}"] = res
            print(f"{ds:14s} {spec:40s} LR test {res['test']:.3f} val {res['validation']:.3f} "
                  f"MLP test {res['mlp_test']:.3f} val {res['mlp_validation']:.3f} (mean of {args.seeds}) "
                  f"C={res['C']} dim={res['dim']} {ms:.1f} cpu-s/1000", flush=True)
        for spec in args.train:
            name, _, opts = spec.partition(":")
            runs = [train_encoder(name, json.loads(opts or "{}"), images, labels, args.epochs, seed)
                    for seed in range(args.seeds)]
            res = {**runs[0], **{k: float(np.mean([r[k] for r in runs])) for k in ("validation", "test")},
                   "test_runs": [r["test"] for r in runs]}
            results[f"{ds} | trained {spec}"] = res
            print(f"{ds:14s} trained {spec:32s} test {res['test']:.3f} val {res['validation']:.3f} "
                  f"(epoch {res['best_epoch']}) {res['cpu_seconds_per_epoch']} cpu-s/epoch "
                  f"{res['seconds_per_1000']} cpu-s/1000", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
