"""Module fusion for inference (zoo/optimize.py, zoo/fold.py): BatchNorm folded into convs gives the same outputs
(1e-4) with no BN left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from fusion_errors import InputError
from zoo.conv_act import ConvAct2d, conv_act_available
from zoo.fold import count_batchnorms, find_foldable_pairs, fold_pairs
from zoo.optimize import example_image_batch, fuse_for_inference

needs_onednn = pytest.mark.skipif(not conv_act_available(), reason="this torch has no oneDNN conv + activation")


def _max_diff(a, b) -> float:
    return max(float((a.tokens - b.tokens).abs().max()), float((a.pooled - b.pooled).abs().max()))


@pytest.mark.parametrize("name", ["tiny-image", "efficientnet-lite0"])
def test_fused_image_encoder_matches(name: str, randomise_norms) -> None:
    enc = create_encoder(name)
    if name == "tiny-image":
        randomise_norms(enc)
    batch = example_image_batch(enc, batch_size=2)
    fused = fuse_for_inference(enc)
    assert count_batchnorms(enc) > 0 and count_batchnorms(fused) == 0
    with torch.no_grad():
        assert _max_diff(enc(batch), fused(batch)) <= 1e-4
    # the original is untouched (a deep copy was fused)
    assert any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())


def test_batchnormact_keeps_activation(randomise_norms) -> None:
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.ReLU))
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    unfused = fuse_for_inference(model, example=x, conv_act=False)
    assert isinstance(unfused[1], nn.ReLU)
    fused = fuse_for_inference(model, example=x)
    # the BatchNormAct's ReLU either stays a module after the conv or runs inside it (ConvAct2d)
    assert isinstance(fused[1], nn.ReLU) or (isinstance(fused[0], ConvAct2d) and isinstance(fused[0].act, nn.ReLU))
    for out in (unfused, fused):
        with torch.no_grad():
            assert torch.allclose(model(x), out(x), atol=1e-5)
            assert bool((out(x) >= 0).all()) and bool((out(x) == 0).any())


def test_linear_batchnorm1d_and_a_biasless_conv_fold_into_the_layer_itself(randomise_norms) -> None:
    """The fold writes new weights into the conv/linear module of the copy; the original model keeps its own."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6))
    randomise_norms(model)
    model[4].running_mean.copy_(torch.randn(6, generator=gen))
    model[4].running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    model[4].weight.data.copy_(torch.randn(6, generator=gen))
    model.eval()
    weights = [model[0].weight.clone(), model[3].weight.clone()]
    x = torch.randn(3, 3, 5, 5, generator=gen)
    fused = fuse_for_inference(model, example=x, channels_last=False)
    assert count_batchnorms(fused) == 0 and fused[0].bias is not None
    assert fused[0] is not model[0] and fused[3] is not model[3]
    assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[3].weight, weights[1])
    assert not any(p.requires_grad for p in fused.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-5)


def test_fold_pairs_refuses_a_norm_without_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_foldable_pairs(model, torch.randn(1, 3, 4, 4)) == []  # never offered by the pair finder
    with pytest.raises(InputError, match="no running statistics.*unfused"):
        fold_pairs(model, [("0", "1")])


def test_conv_feeding_two_readers_is_not_folded(randomise_norms) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + self.other(y)

    model = Branchy()
    randomise_norms(model)
    x = torch.randn(1, 3, 4, 4)
    assert find_foldable_pairs(model, x) == []
    fused = fuse_for_inference(model, example=x)
    assert torch.allclose(model.eval()(x), fused(x), atol=1e-6)


def test_fusion_model_fuses_its_image_encoder(randomise_norms) -> None:
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    cfg = FusionModelConfig(encoders={"image": "tiny-image"}, labels=("a", "b"), hidden_dim=16)
    model = FusionModel(cfg).eval()
    randomise_norms(model)
    fused = fuse_for_inference(model)
    assert isinstance(fused, FusionModel) and count_batchnorms(fused) == 0
    batch = {"image": example_image_batch(model.encoders["image"], 2)}
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, fused(batch).logits, atol=1e-4)


def test_module_without_example_is_an_input_error() -> None:
    with pytest.raises(InputError, match="example"):
        fuse_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


@needs_onednn
def test_a_fused_activation_that_changes_outputs_is_undone_and_the_fold_kept(monkeypatch, randomise_norms) -> None:
    import zoo.optimize as optimize

    class Peek(nn.Module):
        """Reads the conv's output with a plain op before its in-place ReLU: invisible to module hooks."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.act = nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv2(self.bn(self.conv(x)))
            before = y * 2
            return self.act(y) + before

    model = Peek()
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    fused_pairs: list[list[tuple[str, str]]] = []
    real_fuse = optimize.fuse_conv_activations
    monkeypatch.setattr(optimize, "fuse_conv_activations",
                        lambda *a, **k: fused_pairs.append(real_fuse(*a, **k)) or fused_pairs[-1])
    fused = fuse_for_inference(model, example=x)
    assert fused_pairs == [[("conv2", "act"), ("conv", "")]]  # the pair was fused, then undone with the lone conv
    assert count_batchnorms(fused) == 0 and not any(isinstance(m, ConvAct2d) for m in fused.modules())
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)

