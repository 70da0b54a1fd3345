"""Module fusion for inference: BatchNorm folded into convs gives the same outputs (1e-4) with no BN left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from fusion_errors import InputError
from zoo.optimize import count_batchnorms, example_image_batch, find_foldable_pairs, fuse_for_inference


def _randomise_norms(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights so a wrong fold shows."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def _max_diff(a, b) -> float:
    return max(float((a.tokens - b.tokens).abs().max()), float((a.pooled - b.pooled).abs().max()))


@pytest.mark.parametrize("name", ["tiny-image", "efficientnet-lite0"])
def test_fused_image_encoder_matches(name: str) -> None:
    enc = create_encoder(name)
    if name == "tiny-image":
        _randomise_norms(enc)
    batch = example_image_batch(enc, batch_size=2)
    fused = fuse_for_inference(enc)
    assert count_batchnorms(enc) > 0 and count_batchnorms(fused) == 0
    with torch.no_grad():
        assert _max_diff(enc(batch), fused(batch)) <= 1e-4
    # the original is untouched (a deep copy was fused)
    assert any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())


def test_batchnormact_keeps_activation() -> None:
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.ReLU))
    _randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_for_inference(model, example=x)
    assert isinstance(fused[1], nn.ReLU)
    assert torch.allclose(model(x), fused(x), atol=1e-5)
    assert bool((fused(x) >= 0).all())


def test_conv_feeding_two_readers_is_not_folded() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + self.other(y)

    model = Branchy()
    _randomise_norms(model)
    x = torch.randn(1, 3, 4, 4)
    assert find_foldable_pairs(model, x) == []
    fused = fuse_for_inference(model, example=x)
    assert torch.allclose(model.eval()(x), fused(x), atol=1e-6)


def test_fusion_model_fuses_its_image_encoder() -> None:
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    cfg = FusionModelConfig(encoders={"image": "tiny-image"}, labels=("a", "b"), hidden_dim=16)
    model = FusionModel(cfg).eval()
    _randomise_norms(model)
    fused = fuse_for_inference(model)
    assert isinstance(fused, FusionModel) and count_batchnorms(fused) == 0
    batch = {"image": example_image_batch(model.encoders["image"], 2)}
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, fused(batch).logits, atol=1e-4)


def test_module_without_example_is_an_input_error() -> None:
    with pytest.raises(InputError, match="example"):
        fuse_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
