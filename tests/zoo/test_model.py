"""FusionModel wiring: stages, missing modalities, modality dropout, head swap."""

from __future__ import annotations

import pytest
import torch

from encoders import ModalityOutput
from fusion_errors import InputError
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

DIMS = {"audio": 6, "image": 5, "text": 4}


def features(b: int = 4, t: int = 3) -> dict[str, ModalityOutput]:
    g = torch.Generator().manual_seed(0)
    return {m: ModalityOutput(torch.randn(b, t, d, generator=g), torch.ones(b, t, dtype=torch.bool),
                              torch.randn(b, d, generator=g)) for m, d in DIMS.items()}


def model(stage: str, **kw: object) -> FusionModel:
    cfg = FusionModelConfig(encoders={m: "synthetic" for m in DIMS}, labels=("x", "y", "z"), stage=stage,
                            hidden_dim=8, **kw)
    return FusionModel(cfg, embed_dims=DIMS).eval()


@pytest.mark.parametrize("stage", ["early", "late", "hybrid"])
def test_outputs_and_missing_modalities(stage: str) -> None:
    m = model(stage)
    feats = features()
    out = m(feats)
    assert out.logits.shape == (4, 3)
    assert (stage == "early") == (out.modality_logits == {})
    one = m({"text": feats["text"]})
    assert one.logits.shape == (4, 3) and torch.isfinite(one.logits).all()
    with pytest.raises(InputError, match="every modality is missing"):
        m({})


def test_hybrid_mix_ignores_absent_modalities() -> None:
    m = model("hybrid")
    feats = features()
    out_all_text_absent = m({k: v for k, v in feats.items() if k != "text"})
    txt = feats["text"]
    hidden = ModalityOutput(torch.randn_like(txt.tokens), torch.zeros_like(txt.mask), torch.randn_like(txt.pooled))
    out_masked = m({**{k: v for k, v in feats.items() if k != "text"}, "text": hidden})
    # a modality absent by mask and absent by key give the same prediction (learned missing embedding)
    torch.testing.assert_close(out_masked.logits, out_all_text_absent.logits)


def test_modality_dropout_never_drops_last_modality() -> None:
    m = model("late", modality_dropout={"audio": 0.9, "image": 0.9, "text": 0.9}).train()
    out = m(features(b=256))
    present = torch.stack(list(out.present.values()))  # [M, B]
    assert present.any(0).all()
    assert (~present).any()  # and it does drop something


def test_swap_head_keeps_projections() -> None:
    m = model("early")
    before = {k: v.clone() for k, v in m.proj.state_dict().items()}
    m.swap_fusion_head("concat", hidden_dim=16)
    assert m.config.head_options == {"hidden_dim": 16}
    for k, v in m.proj.state_dict().items():
        assert torch.equal(v, before[k])
    assert m(features()).logits.shape == (4, 3)
