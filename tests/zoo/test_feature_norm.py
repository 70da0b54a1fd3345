"""Feature standardisation (``FusionModelConfig.standardize``): fitted on training features, saved with the
weights, applied wherever the model runs; older configs keep their unstandardised layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from encoders import ModalityOutput
from zoo import from_pretrained
from zoo.config import FusionModelConfig
from zoo.model import FusionModel


def _cfg(**kw: object) -> FusionModelConfig:
    return FusionModelConfig(encoders={"image": "tiny-image", "text": "tiny-text"}, labels=("a", "b"),
                             hidden_dim=8, **kw)  # type: ignore[arg-type]


def _feats(dims: dict[str, int] | None = None, n: int = 50) -> dict[str, ModalityOutput]:
    g = torch.Generator().manual_seed(0)
    dims = dims or {"image": 6, "text": 4}
    out = {}
    for m, (scale, shift) in {"image": (100.0, 5.0), "text": (0.01, -3.0)}.items():
        d = dims[m]
        pooled = torch.randn(n, d, generator=g) * scale + shift
        present = torch.ones(n, dtype=torch.bool)
        present[:5] = False
        pooled[~present] = 0
        out[m] = ModalityOutput(pooled[:, None], present[:, None], pooled)
    return out


def test_fit_centres_and_scales_present_rows_and_keeps_absent_ones_zero() -> None:
    feats = _feats()
    model = FusionModel(_cfg(), embed_dims={"image": 6, "text": 4})
    assert model.fit_feature_norm(feats) == ["image", "text"]
    assert model.fit_feature_norm(feats) == []  # fitted once: a loaded or resumed model keeps its statistics
    for m, f in feats.items():
        z = model.feature_norm[m](f)
        keep = f.present
        torch.testing.assert_close(z.pooled[keep].mean(0), torch.zeros(f.dim), atol=1e-4, rtol=0)
        rms = z.pooled[keep].pow(2).mean().sqrt()
        torch.testing.assert_close(rms, torch.tensor(1.0), atol=1e-4, rtol=0)  # one scale for the modality
        ratio = z.pooled[keep].std(0) / f.pooled[keep].std(0)
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=0)  # dimensions keep theirs
        assert not z.pooled[~keep].any() and not z.tokens[~keep].any()


def test_statistics_travel_with_the_weights(tmp_path: Path) -> None:
    model = FusionModel(_cfg())
    feats = _feats(model.embed_dims)
    model.fit_feature_norm(feats)
    model.eval()
    loaded = from_pretrained(model.save_pretrained(tmp_path / "m"))
    for m in model.modalities:
        assert bool(loaded.feature_norm[m].fitted)
        torch.testing.assert_close(loaded.feature_norm[m].mean, model.feature_norm[m].mean, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.fuse(feats).logits, model.fuse(feats).logits, rtol=0, atol=0)


def test_a_version_2_config_loads_without_standardisation_and_with_a_linear_concat() -> None:
    doc = json.loads(_cfg().to_json())
    doc["format_version"] = 2
    doc.pop("standardize")
    doc["head_options"] = {}
    cfg = FusionModelConfig.from_dict(doc)
    assert cfg.standardize is False and cfg.head_options == {"hidden_dim": 0}
    model = FusionModel(cfg, embed_dims={"image": 6, "text": 4})
    assert not hasattr(model, "feature_norm")
    assert not any("feature_norm" in k for k in model.state_dict())


def test_a_new_concat_config_records_its_width() -> None:
    assert _cfg().head_options == {"hidden_dim": 16}
    assert _cfg(head_options={"hidden_dim": 0}).head_options == {"hidden_dim": 0}


def test_the_chunked_fit_equals_the_whole_array_fit() -> None:
    """FeatureNorm.fit reads row chunks (a memory-mapped store is never copied whole); the statistics are those
    of the whole array within float rounding."""
    import pytest

    from zoo.model import FeatureNorm

    gen = torch.Generator().manual_seed(0)
    pooled = torch.randn(1000, 7, generator=gen) * 3 + 5  # [N, D]
    present = torch.rand(1000, generator=gen) > 0.2  # [N]
    whole, chunked = FeatureNorm(7), FeatureNorm(7)
    whole.fit(pooled, present, chunk=10**9)
    chunked.fit(pooled, present, chunk=33)
    x = pooled[present].double()
    torch.testing.assert_close(chunked.mean.double(), x.mean(0), rtol=0, atol=1e-6)
    assert float(chunked.std[0]) == pytest.approx(float((x - x.mean(0)).pow(2).mean().sqrt()), rel=1e-6)
    torch.testing.assert_close(chunked.mean, whole.mean)
    torch.testing.assert_close(chunked.std, whole.std)
