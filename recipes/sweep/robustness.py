"""Robustness of a trained fused model: every subset of modalities, and noise per modality.

Works on encoder outputs (``ModalityOutput``), so the perturbations live in **feature space**:

* ``<modality>_noise@s`` (image, audio): Gaussian noise with standard deviation ``s`` times the per-dimension
  standard deviation of that modality's features (over the evaluated samples), added to valid tokens and to
  the pooled vector (independent draws); absent samples stay absent.
* ``text_drop@p``: a fraction ``p`` of each present sample's valid text tokens is removed from the mask (at least
  one token is kept) and the pooled vector is recomputed as the mean of the kept tokens (what the mean-pooling
  text encoders compute). When the features hold no tokens (a pooled-only cache, as in the ``late`` stage,
  where tokens are one copy of the pooled vector), token dropout cannot be expressed and is applied as
  Gaussian feature noise of relative scale ``p`` instead.
* ``only:<m1>+<m2>``: the model sees just those modalities (the others are absent for every sample).

A model fed raw inputs would need the perturbation in raw-input space; this module never sees raw inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from encoders import ModalityOutput
from fusion_errors import InputError
from recipes.metrics import task_metrics

__all__ = ["modality_subsets", "add_feature_noise", "drop_tokens", "evaluate_features", "robustness_report",
           "primary_metric", "DEFAULT_NOISE", "DEFAULT_TOKEN_DROP"]

DEFAULT_NOISE = (0.5, 1.0)
DEFAULT_TOKEN_DROP = (0.3, 0.6)


def primary_metric(task: str) -> str:
    """The headline metric of a task: ``accuracy`` for classification, ``mae`` for regression."""
    return "mae" if task == "regression" else "accuracy"


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities`` (sorted within, smallest subsets first)."""
    mods = sorted(modalities)
    return [c for k in range(1, len(mods) + 1) for c in itertools.combinations(mods, k)]


def _std(f: ModalityOutput) -> tuple[Tensor, Tensor]:
    """Per-dimension std of valid tokens [D] and of present pooled vectors [D] (ones when undefined)."""
    tok = f.tokens[f.mask]  # [N, D]
    pool = f.pooled[f.present]  # [P, D]
    ts = tok.std(0) if tok.shape[0] > 1 else torch.ones(f.dim)
    ps = pool.std(0) if pool.shape[0] > 1 else torch.ones(f.dim)
    return ts, ps


def add_feature_noise(f: ModalityOutput, scale: float, generator: torch.Generator) -> ModalityOutput:
    """Gaussian noise of ``scale`` × per-dimension std on valid tokens and present pooled vectors."""
    ts, ps = _std(f)
    tn = torch.randn(f.tokens.shape, generator=generator) * ts * scale  # [B, T, D]
    pn = torch.randn(f.pooled.shape, generator=generator) * ps * scale  # [B, D]
    tokens = f.tokens + tn * f.mask[..., None].to(tn.dtype)
    pooled = f.pooled + pn * f.present[:, None].to(pn.dtype)
    return ModalityOutput(tokens, f.mask, pooled)


def drop_tokens(f: ModalityOutput, rate: float, generator: torch.Generator) -> ModalityOutput:
    """Remove a fraction ``rate`` of each sample's valid tokens from the mask (keep >= 1); pooled = kept mean.

    Pooled-only features (a single token per sample) get Gaussian noise of relative scale ``rate`` instead.
    """
    if not 0.0 <= rate < 1.0:
        raise InputError(f"token drop rate {rate} must be in [0, 1).")
    if f.tokens.shape[1] <= 1:
        return add_feature_noise(f, rate, generator)
    scores = torch.rand(f.mask.shape, generator=generator).masked_fill(~f.mask, 2.0)  # [B, T]
    valid = f.mask.sum(1)  # [B]
    n_drop = torch.minimum((valid.float() * rate).floor().long(), (valid - 1).clamp_min(0))  # [B]
    ranks = scores.argsort(1).argsort(1)  # [B, T] rank of each token's score
    mask = f.mask & (ranks >= n_drop[:, None])
    w = mask[..., None].to(f.tokens.dtype)  # [B, T, 1]
    pooled = (f.tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, D]
    pooled = torch.where(f.present[:, None], pooled, f.pooled)
    return ModalityOutput(f.tokens, mask, pooled)


@torch.no_grad()
def evaluate_features(
    model: Any,
    feats: Mapping[str, ModalityOutput],
    labels: Tensor,
    batch_size: int = 512,
) -> float:
    """The model's primary metric on ``feats`` (modality -> ModalityOutput over N samples) and ``labels``.

    Samples with none of the given modalities present are skipped.
    """
    cfg = model.config
    metric = task_metrics(cfg.task, cfg.num_outputs)
    name = primary_metric(cfg.task)
    was = model.training
    model.eval()
    n = labels.shape[0]
    seen = 0
    try:
        for start in range(0, n, batch_size):
            idx = slice(start, min(n, start + batch_size))
            chunk = {m: f.index(idx) for m, f in sorted(feats.items())}
            keep = torch.stack([c.present for c in chunk.values()]).any(0)  # [b]
            if not bool(keep.any()):
                continue
            chunk = {m: c.index(keep) for m, c in chunk.items()}
            logits = model.fuse(chunk).logits.float()  # [b, C]
            y = labels[idx][keep]
            if cfg.task == "multiclass":
                metric.update(logits.softmax(-1), y.long())
            elif cfg.task == "multilabel":
                metric.update(logits.sigmoid(), y.long())
            else:
                metric.update(logits.flatten(), y.float().reshape(logits.shape).flatten())
            seen += int(keep.sum())
    finally:
        model.train(was)
    return float(metric.compute()[name]) if seen else float("nan")


def robustness_report(
    model: Any,
    feats: Mapping[str, ModalityOutput],
    labels: Tensor,
    noise: Sequence[float] = DEFAULT_NOISE,
    token_drop: Sequence[float] = DEFAULT_TOKEN_DROP,
    seed: int = 0,
) -> dict[str, float]:
    """Primary metric per condition: ``all``, ``only:<subset>`` for every proper non-empty subset,
    ``<image|audio>_noise@s`` per noise level and ``text_drop@p`` per drop rate (those modalities present).

    Args:
        model: a ``FusionModel`` (head-only is fine) whose ``fuse`` takes ``feats``.
        feats: modality -> features over the evaluation set; labels: [N] (or [N, C]).
        noise: relative noise scales for image and audio; token_drop: text token drop rates.
        seed: seed of the noise and drop draws (the same for every model, so conditions are paired).
    """
    if len(noise) < 1 or len(token_drop) < 1:
        raise InputError("give at least one noise level and one token drop rate.")
    mods = sorted(feats)
    out = {"all": evaluate_features(model, feats, labels)}
    for subset in modality_subsets(mods):
        if len(subset) < len(mods):
            out["only:" + "+".join(subset)] = evaluate_features(model, {m: feats[m] for m in subset}, labels)
    for m in mods:
        levels = token_drop if m == "text" else noise
        for level in levels:
            gen = torch.Generator().manual_seed(seed)
            changed = drop_tokens(feats[m], level, gen) if m == "text" else add_feature_noise(feats[m], level, gen)
            key = f"text_drop@{level:g}" if m == "text" else f"{m}_noise@{level:g}"
            out[key] = evaluate_features(model, {**feats, m: changed}, labels)
    return out
