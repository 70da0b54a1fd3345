"""Every head at every stage learns a task that needs two modalities (XOR), while each alone stays at chance."""

from __future__ import annotations

import pytest
import torch

from encoders import ModalityOutput
from fusion_heads import list_fusion_heads
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

DIM = 8  # xor_features' feature width


def accuracy(model: FusionModel, feats: dict[str, ModalityOutput], labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(feats).logits.argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize("stage", ["early", "late", "hybrid"])
@pytest.mark.parametrize("head", list_fusion_heads())
def test_every_head_and_stage_learns_xor(head: str, stage: str, xor_features, train_on_features) -> None:
    torch.manual_seed(0)
    config = FusionModelConfig(
        encoders={"image": "synthetic", "text": "synthetic"}, labels=("even", "odd"), fusion_head=head,
        stage=stage, hidden_dim=32, dropout=0.0, late_loss_weight=0.1,
    )
    model = FusionModel(config, embed_dims={"image": DIM, "text": DIM})
    train, y = xor_features(512, seed=1)
    test, y_test = xor_features(512, seed=2)
    train_on_features(model, train, y, lambda step: accuracy(model, test, y_test) >= 0.97)
    assert accuracy(model, test, y_test) >= 0.95, f"{head}@{stage} did not learn XOR"
    for m in ("image", "text"):  # one bit alone says nothing about the XOR
        alone = accuracy(model, {m: test[m]}, y_test)
        assert 0.35 <= alone <= 0.65, f"{head}@{stage} with {m} alone: {alone:.2f}, expected chance"
