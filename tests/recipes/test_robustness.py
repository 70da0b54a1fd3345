"""Robustness evaluation on synthetic cached features with a head-only model."""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
import torch

from encoders import ModalityOutput
from recipes.sweep.robustness import (
    add_feature_noise,
    drop_tokens,
    evaluate_features,
    modality_subsets,
    robustness_report,
)
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

DIMS = {"audio": 6, "image": 8, "text": 5}


def _features(n: int = 40, tokens: int = 4, seed: int = 0) -> tuple[dict[str, ModalityOutput], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    feats = {}
    for m, d in DIMS.items():
        tok = torch.randn(n, tokens, d, generator=gen)  # [N, T, D]
        tok[:, :, 0] += labels[:, None].float() * 3.0  # the label is readable from every modality
        mask = torch.ones(n, tokens, dtype=torch.bool)
        mask[: n // 4, tokens // 2:] = False  # some shorter sequences
        pooled = (tok * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        feats[m] = ModalityOutput(tok, mask, pooled)
    return feats, labels


def _model(stage: str = "early") -> FusionModel:
    cfg = FusionModelConfig(encoders={m: "tiny" for m in DIMS}, labels=("a", "b", "c"), stage=stage, hidden_dim=16)
    torch.manual_seed(0)
    return FusionModel(cfg, embed_dims=DIMS)


def test_modality_subsets_are_every_non_empty_subset() -> None:
    subs = modality_subsets(["text", "audio", "image"])
    assert len(subs) == 7 and len(set(subs)) == 7
    assert subs[0] == ("audio",) and subs[-1] == ("audio", "image", "text")
    assert modality_subsets(["text"]) == [("text",)]


# 12 samples (label i % 3); each modality's pooled vector is its 3 class scores. The oracle below predicts the
# argmax of the summed scores of the present modalities, so each subset's accuracy was counted by hand (no tie
# is closer than 0.05).
SCORES = {
    "audio": [[1.3, 0.1, 2.3], [0.9, 2.1, 0.6], [0.0, 1.6, 2.7], [2.2, 2.6, 0.6], [2.4, 2.9, 0.2], [1.6, 0.7, 1.0],
              [2.4, 2.1, 0.9], [2.9, 1.5, 0.1], [0.8, 2.3, 1.8], [2.9, 2.7, 1.3], [1.5, 0.5, 0.7], [1.0, 2.0, 1.6]],
    "image": [[2.1, 0.3, 0.7], [0.1, 0.9, 2.2], [2.6, 0.8, 1.7], [1.7, 2.2, 1.6], [0.1, 2.6, 1.5], [0.9, 2.6, 0.6],
              [2.9, 1.1, 1.4], [0.9, 1.5, 2.8], [0.2, 2.8, 0.1], [1.3, 0.3, 1.8], [0.5, 1.8, 2.4], [0.5, 1.9, 0.3]],
    "text": [[1.0, 1.8, 1.2], [0.9, 1.0, 2.8], [2.2, 1.4, 1.2], [2.2, 2.3, 1.1], [1.6, 0.4, 2.1], [2.1, 2.5, 0.5],
             [0.6, 2.8, 1.4], [2.0, 1.8, 2.5], [2.4, 0.4, 0.1], [1.9, 1.2, 2.9], [2.2, 0.4, 1.5], [0.8, 0.1, 0.1]],
}
CORRECT = {"only:audio": 5, "only:image": 3, "only:text": 0, "only:audio+image": 6, "only:audio+text": 2,
           "only:image+text": 1, "all": 4}  # of 12


class ScoreSumOracle(torch.nn.Module):
    """A stand-in fused model: logits = sum of the present modalities' pooled vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.config = FusionModelConfig(encoders={m: "tiny" for m in SCORES}, labels=("a", "b", "c"))

    def fuse(self, feats: dict[str, ModalityOutput]) -> Any:
        logits = sum(f.pooled * f.present[:, None] for f in feats.values())  # [B, 3]
        return types.SimpleNamespace(logits=logits)


def _score_features() -> tuple[dict[str, ModalityOutput], torch.Tensor]:
    feats = {}
    for m, rows in SCORES.items():
        pooled = torch.tensor(rows)  # [12, 3]
        feats[m] = ModalityOutput(pooled[:, None], torch.ones(12, 1, dtype=torch.bool), pooled)
    return feats, torch.arange(12) % 3


def test_report_scores_every_subset_against_hand_counted_accuracies() -> None:
    feats, labels = _score_features()
    report = robustness_report(ScoreSumOracle(), feats, labels, noise=(0.5, 1.0), token_drop=(0.25,))
    assert {k: round(v * 12) for k, v in report.items() if k == "all" or k.startswith("only:")} == CORRECT
    assert set(report) - set(CORRECT) == {"audio_noise@0.5", "audio_noise@1", "image_noise@0.5", "image_noise@1",
                                         "text_drop@0.25"}


def test_samples_missing_every_given_modality_are_not_scored() -> None:
    feats, labels = _score_features()
    image = feats["image"]
    absent = torch.ones(12, 1, dtype=torch.bool)
    absent[:6] = False  # the first six samples have no image: scored on the other six only
    half = ModalityOutput(image.tokens, absent, image.pooled)
    # argmax of image's scores on samples 6..11: 0, 2, 1, 2, 2, 1 against labels 0, 1, 2, 0, 1, 2: one right
    assert evaluate_features(ScoreSumOracle(), {"image": half}, labels) == pytest.approx(1 / 6)


def test_noise_scales_with_feature_std_and_spares_absent_samples() -> None:
    feats, _ = _features(n=400)
    f = feats["image"]
    f = ModalityOutput(f.tokens * 10.0, f.mask.clone(), f.pooled * 10.0)
    f.mask[:5] = False  # five absent samples
    noisy = add_feature_noise(f, 1.0, torch.Generator().manual_seed(0))
    delta = (noisy.pooled - f.pooled)[5:]
    ratio = delta.std(0) / f.pooled[5:].std(0)  # [D] per-dimension noise std relative to the feature std
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all())
    assert torch.equal(noisy.pooled[:5], f.pooled[:5]) and torch.equal(noisy.mask, f.mask)
    assert torch.equal(noisy.tokens[~f.mask], f.tokens[~f.mask])


def test_token_drop_removes_the_fraction_and_keeps_one() -> None:
    feats, _ = _features(n=20, tokens=10)
    t = feats["text"]
    dropped = drop_tokens(t, 0.5, torch.Generator().manual_seed(0))
    before, after = t.mask.sum(1), dropped.mask.sum(1)
    assert torch.equal(after, before - (before.float() * 0.5).floor().long())
    assert bool((dropped.mask <= t.mask).all())
    kept_mean = (t.tokens * dropped.mask[..., None]).sum(1) / after[:, None]
    assert torch.allclose(dropped.pooled, kept_mean, atol=1e-6)
    one = ModalityOutput(t.tokens[:, :1], t.mask[:, :1], t.pooled)
    assert bool(drop_tokens(one, 0.9, torch.Generator().manual_seed(0)).mask.all())  # noise, not a drop


def test_heavy_noise_hurts_a_model_that_reads_that_modality() -> None:
    feats, labels = _features(n=200)
    model = _model("late")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model.fuse({"image": feats["image"]}).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clean = evaluate_features(model, {"image": feats["image"]}, labels)
    report = robustness_report(model, {"image": feats["image"]}, labels, noise=(3.0,))
    assert clean > 0.8 and report["image_noise@3"] < clean - 0.1
    assert math.isnan(evaluate_features(model, {"image": ModalityOutput(
        feats["image"].tokens, torch.zeros_like(feats["image"].mask), feats["image"].pooled)}, labels))
