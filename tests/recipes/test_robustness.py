"""Robustness evaluation on synthetic cached features with a head-only model."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("stage", ["early", "late"])
def test_report_has_every_subset_and_noise_level(stage: str) -> None:
    feats, labels = _features()
    report = robustness_report(_model(stage), feats, labels, noise=(0.5, 1.0), token_drop=(0.25, 0.5))
    expected = {"all", "only:audio", "only:image", "only:text", "only:audio+image", "only:audio+text",
                "only:image+text", "audio_noise@0.5", "audio_noise@1", "image_noise@0.5", "image_noise@1",
                "text_drop@0.25", "text_drop@0.5"}
    assert set(report) == expected
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_subset_accuracy_matches_direct_evaluation() -> None:
    feats, labels = _features()
    model = _model()
    report = robustness_report(model, feats, labels)
    assert report["only:image"] == pytest.approx(evaluate_features(model, {"image": feats["image"]}, labels))
    with torch.no_grad():
        preds = model.eval().fuse(feats).logits.argmax(-1)
    assert report["all"] == pytest.approx(float((preds == labels).float().mean()))


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
