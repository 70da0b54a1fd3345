"""StaticSameConv2d (zoo/same_pad.py): TF "same" padding moved into the convolution, checked against timm's
Conv2dSame."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from zoo.optimize import fuse_for_inference
from zoo.same_pad import StaticSameConv2d


def _max_diff(a, b) -> float:
    return max(float((a.tokens - b.tokens).abs().max()), float((a.pooled - b.pooled).abs().max()))


@pytest.mark.parametrize("kernel,stride,dilation,groups", [(3, 2, 1, 1), (5, 2, 1, 6), (3, 1, 1, 6), (4, 2, 1, 1),
                                                            (3, 2, 2, 6), (5, 3, 1, 1)])
@pytest.mark.parametrize("size", [(16, 16), (17, 15), (9, 12)])
def test_static_same_conv_matches_timm(kernel: int, stride: int, dilation: int, groups: int,
                                       size: tuple[int, int]) -> None:
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(6, 12, kernel, stride=stride, dilation=dilation, groups=groups, bias=True).eval()
    static = StaticSameConv2d(conv)
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        ref, out = conv(x), static(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input size is a constant of the trace
def test_static_same_conv_moves_an_asymmetric_pad_into_the_kernel() -> None:
    from timm.layers import Conv2dSame

    conv = Conv2dSame(4, 4, 3, stride=2, groups=4, bias=False)
    static = StaticSameConv2d(conv)
    # an even input needs (0, 1) padding: the conv runs a 4x4 kernel whose first row and column are zero
    shifted = static.get_buffer("weight_shift_11")
    assert shifted.shape == (4, 1, 4, 4)
    assert bool((shifted[..., 0, :] == 0).all()) and bool((shifted[..., 0] == 0).all())
    assert torch.equal(shifted[..., 1:, 1:], conv.weight.detach())
    assert list(static.state_dict()) == ["weight"]  # derived kernels are never saved
    with torch.no_grad():  # and it traces with the shifted kernel as a fixed-shape constant
        traced = torch.jit.trace(static, torch.randn(1, 4, 8, 8))
        y = torch.randn(3, 4, 8, 8)
        assert torch.allclose(traced(y), conv(y), atol=1e-6)


@pytest.mark.slow  # efficientnet-lite0's real weights
@pytest.mark.parametrize("size", [(224, 224), (97, 130)])
def test_efficientnet_lite0_inference_copy_pads_inside_its_convolutions(size: tuple[int, int]) -> None:
    from timm.layers import Conv2dSame

    enc = create_encoder("efficientnet-lite0", finetune="frozen")
    fused = fuse_for_inference(enc)
    assert not any(isinstance(m, (Conv2dSame, nn.BatchNorm2d)) for m in fused.modules())
    assert sum(isinstance(m, StaticSameConv2d) for m in fused.modules()) == 5  # the stem and 4 stride-2 depthwise
    x = torch.randn(3, 3, *size)
    with torch.inference_mode():
        assert _max_diff(enc({"pixel_values": x}), fused({"pixel_values": x})) <= 1e-4

