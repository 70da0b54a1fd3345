"""Measures how much each tridigits modality tells: frozen default encoders + a linear probe per modality and fused.

The pooled embeddings of the project's offline default encoders (``recipes.task.DEFAULT_ENCODERS``: ``minilm-l6``,
``efficientnet-lite0-pixels``, ``whisper-base``) are cached as ``.npy`` files; a standardised logistic regression
is fit on ``train`` and scored on ``test``, once per modality, per pair, on all three concatenated, and as the sum
of the three single-modality probes' log-probabilities (late fusion).
Needs scikit-learn (a dev dependency). Run it with ``python -m recipes.tridigits.build --evaluate``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from recipes.task import DEFAULT_ENCODERS
from recipes.tridigits.dataset import DATA_DIR, load_tridigits

__all__ = ["embed_split", "evaluate"]


@torch.no_grad()
def _embed(name: str, items: list, batch_size: int = 64) -> np.ndarray:
    """Pooled embeddings of ``items`` with the registered encoder ``name`` → [N, D] float32."""
    from encoders import create_encoder

    encoder = create_encoder(name).eval()
    out = []
    for start in range(0, len(items), batch_size):
        batch = encoder.preprocessor(items[start : start + batch_size])
        out.append(encoder(batch).pooled.float().numpy())  # [B, D]
    return np.concatenate(out)


def embed_split(split: str, data_dir: Path = DATA_DIR, cache: Path | None = None) -> dict[str, np.ndarray]:
    """{modality: [N, D] embeddings} of one split, cached under ``cache`` keyed by the split file's checksum."""
    ds = load_tridigits(split, data_dir=data_dir).cast_column("image", __import__("datasets").Image(decode=False))
    digest = hashlib.sha256((data_dir / f"{split}.parquet").read_bytes()).hexdigest()[:16]
    out = {}
    for modality, name in sorted(DEFAULT_ENCODERS.items()):
        path = cache / f"{split}-{modality}-{digest}.npy" if cache else None
        if path is not None and path.is_file():
            out[modality] = np.load(path)
            continue
        column = ds[modality]
        out[modality] = _embed(name, list(column))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out[modality])
    return out


def _probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Test log-probabilities [N, 10] of a standardised multinomial logistic regression fit on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    model.fit(train_x, train_y)
    return model.predict_log_proba(test_x)


def evaluate(data_dir: Path = DATA_DIR, cache: Path | None = None) -> dict[str, float]:
    """Test accuracy of a linear probe on each modality alone, on each pair and on all three concatenated.

    ``late:audio+image+text`` sums the three single-modality probes' log-probabilities (late fusion).
    """
    train, test = embed_split("train", data_dir, cache), embed_split("test", data_dir, cache)
    y_train = np.asarray(load_tridigits("train", data_dir=data_dir)["label"])
    y_test = np.asarray(load_tridigits("test", data_dir=data_dir)["label"])
    groups = [["audio"], ["image"], ["text"], ["audio", "image"], ["audio", "text"], ["image", "text"],
              ["audio", "image", "text"]]  # fmt: skip
    results, log_probs = {}, {}
    for group in groups:
        x_tr = np.concatenate([train[m] for m in group], axis=1)  # [N, sum D]
        x_te = np.concatenate([test[m] for m in group], axis=1)
        log_probs["+".join(group)] = _probe(x_tr, y_train, x_te)  # [N, 10]
        results["+".join(group)] = float((log_probs["+".join(group)].argmax(1) == y_test).mean())
    late = log_probs["audio"] + log_probs["image"] + log_probs["text"]  # [N, 10]
    results["late:audio+image+text"] = float((late.argmax(1) == y_test).mean())
    return results
