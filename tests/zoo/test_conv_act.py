"""ConvAct2d (zoo/conv_act.py): a conv and the ReLU/ReLU6 after it as one oneDNN kernel, bit-identical to the two
ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from fusion_errors import InputError
from zoo.conv_act import ConvAct2d, conv_act_available, fuse_conv_activations, unfuse_conv_activations
from zoo.optimize import fuse_for_inference
from zoo.same_pad import StaticSameConv2d

needs_onednn = pytest.mark.skipif(not conv_act_available(), reason="this torch has no oneDNN conv + activation")


def _module_calls(fused: ConvAct2d) -> list[str]:
    """Records each call of ``fused``'s own conv and act modules (the eager path; the oneDNN kernel calls neither)."""
    calls: list[str] = []
    fused.conv.register_forward_hook(lambda *_: calls.append("conv"))
    fused.act.register_forward_hook(lambda *_: calls.append("act"))
    return calls


@needs_onednn
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(inplace=True), nn.Hardtanh(-0.5, 0.25)])
@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (6, 2, 1), (2, 1, 0)])
@pytest.mark.parametrize("channels_last_input", [False, True])
def test_conv_act_is_bit_identical_to_conv_then_activation(act: nn.Module, groups: int, stride: int, padding: int,
                                                           channels_last_input: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, stride=stride, padding=padding, groups=groups).eval().requires_grad_(False)
    conv = conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as inference copies hold it
    fused = ConvAct2d(conv, act)
    x = torch.randn(3, 6, 15, 13) * 3
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = act(conv(x.clone()))
        calls = _module_calls(fused)
        out = fused(x)
    assert calls == []  # the one oneDNN kernel ran, not conv then act
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert bool((out == ref.amin()).any()) and bool((out > ref.amin()).any())  # the clamp really bit


@needs_onednn
def test_conv_act_with_contiguous_weights_runs_eager_pytorch() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, groups=2).eval().requires_grad_(False)  # NCHW weights: not always oneDNN in eager
    x = torch.randn(3, 6, 15, 13)
    fused = ConvAct2d(conv, nn.ReLU())
    with torch.inference_mode():
        ref = conv(x).relu()
        calls = _module_calls(fused)
        assert torch.equal(fused(x), ref)
    assert calls == ["conv", "act"]


@needs_onednn
@pytest.mark.parametrize("size", [(16, 16), (17, 15)])
def test_conv_act_runs_static_same_padding(size: tuple[int, int]) -> None:
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    same = Conv2dSame(4, 4, 3, stride=2, groups=4).eval().requires_grad_(False)
    fused = ConvAct2d(StaticSameConv2d(same), nn.ReLU6())
    x = torch.randn(2, 4, *size) * 4
    with torch.inference_mode():
        assert torch.allclose(fused(x), same(x).clamp(0, 6), atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_a_lone_conv_runs_on_onednn_at_any_thread_count(threads: int) -> None:
    """On one thread eager PyTorch runs a small batch of 1x1 convs through its own im2col kernel: the lone
    ConvAct2d stays on oneDNN, equal to it up to float rounding (bit-identical where eager uses oneDNN too)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1).eval().requires_grad_(False).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fused = ConvAct2d(conv, None)
    assert isinstance(fused.act, nn.Identity) and fused.attr == "none"
    x = torch.randn(5, 24, 14, 14).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ref = conv(x)
            calls = _module_calls(fused)
            with torch.profiler.profile() as prof:
                out = fused(x)
    finally:
        torch.set_num_threads(before)
    ops = {e.key for e in prof.key_averages()}
    assert calls == [] and "mkldnn::_convolution_pointwise" in ops and "aten::_slow_conv2d_forward" not in ops
    if threads > 1:
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@needs_onednn
def test_lone_convs_are_wrapped_only_with_channels_last_weights_and_unwrapped_back() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 3)).eval()
    net[2].to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net[0].to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = net(x)
        done = fuse_conv_activations(net, x, lone=True)
        assert done == [("0", "1"), ("2", "")]  # conv 3 keeps NCHW weights: left as it is
        assert isinstance(net[0], ConvAct2d) and isinstance(net[2], ConvAct2d) and net[2].attr == "none"
        assert type(net[3]) is nn.Conv2d
        torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-6)
        unfuse_conv_activations(net, done)
        assert [type(m) for m in net] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Conv2d]
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)


@needs_onednn
def test_conv_act_reorders_its_kernel_once_and_again_when_it_changes() -> None:
    """The kernel is kept in oneDNN's own layout between calls (bit-identical to reordering it on every call, as
    eager PyTorch does); changed in place or replaced, the next call uses the new weights."""
    import copy
    import pickle

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval().requires_grad_(False).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fused = ConvAct2d(conv, nn.ReLU6())
    x = (torch.randn(5, 8, 12, 12) * 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = fused(x)
        assert len(fused._packed) == 1
        packed = next(iter(fused._packed.values()))[2]
        assert packed.layout == torch._mkldnn  # type: ignore[attr-defined]
        assert torch.equal(fused(x), first) and next(iter(fused._packed.values()))[2] is packed  # reused
        assert torch.equal(first, conv(x).clamp(0, 6))
    with torch.no_grad():
        conv.weight.mul_(-0.5)  # in place: a new version of the same tensor
    with torch.inference_mode():
        assert torch.equal(fused(x), conv(x).clamp(0, 6)) and not torch.equal(fused(x), first)
    conv.weight = nn.Parameter(torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last),
                               requires_grad=False)  # replaced
    with torch.inference_mode():
        assert torch.equal(fused(x), conv(x).clamp(0, 6))
    assert list(fused._packed) == [id(conv.weight)]  # the replaced kernel is let go
    fused.to(torch.float64)
    assert fused._packed == {}  # new tensors after .to(): the old ones are not kept alive
    fused.to(torch.float32)
    with torch.inference_mode():  # a kernel made under inference_mode has no version counter: never kept
        fused.conv.weight = nn.Parameter(conv.weight.clone(), requires_grad=False)
        assert fused.conv.weight.is_inference()
        assert torch.equal(fused(x), fused.conv(x).clamp(0, 6))
        assert all(not kernel.is_inference() for kernel, _, _ in fused._packed.values())
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):  # oneDNN tensors are not copied
        assert twin._packed == {}
        with torch.inference_mode():
            assert torch.equal(twin(x), fused(x))


@needs_onednn
def test_conv_act_runs_with_plain_weights_where_the_reorder_fails(monkeypatch) -> None:
    def refuse(*_args: object) -> torch.Tensor:
        raise RuntimeError("no reorder here")

    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", refuse)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval().requires_grad_(False).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fused = ConvAct2d(conv, nn.ReLU())
    x = torch.randn(3, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = conv(x).relu()
        calls = _module_calls(fused)
        assert torch.equal(fused(x), ref)
    assert calls == [] and fused._packed == {}


def test_conv_act_takes_only_clamps() -> None:
    with pytest.raises(InputError, match="ReLU"):
        ConvAct2d(nn.Conv2d(3, 3, 1), nn.SiLU())


@needs_onednn
def test_conv_act_falls_back_for_autograd_and_tracing() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fused = ConvAct2d(conv, nn.ReLU6())  # channels-last weights: the fused kernel unless a guard says otherwise
    calls = _module_calls(fused)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    fused(x).sum().backward()  # the oneDNN kernel has no backward: autograd runs conv + act
    assert x.grad is not None and fused.conv.weight.grad is not None and calls == ["conv", "act"]
    fused.requires_grad_(False)
    with torch.no_grad():
        calls.clear()
        fused(torch.randn(1, 3, 8, 8))
        assert calls == []  # no autograd: the fused kernel
        traced = torch.jit.trace(fused, torch.randn(1, 3, 8, 8))
    assert "mkldnn" not in str(traced.inlined_graph)  # exported graphs hold standard ops only
    y = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(traced(y), fused.act(fused.conv(y)))


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_only_a_conv_whose_output_goes_straight_into_the_activation_is_fused(threads: int) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act_a = nn.Conv2d(3, 4, 1), nn.ReLU()  # fused
            self.b, self.act_b = nn.Conv2d(4, 4, 1), nn.ReLU()  # b's output also feeds `other`: kept
            self.other = nn.Identity()
            self.c, self.act_c = nn.Conv2d(4, 4, 1), nn.SiLU()  # not a clamp: kept

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(self.act_a(self.a(x)))
            return self.act_c(self.c(self.act_b(y) + self.other(y)))

    net = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # on 2, eager PyTorch runs these NCHW 1x1 convs on oneDNN's NCHW kernels
    try:
        with torch.no_grad():
            ref = net(x)
            assert fuse_conv_activations(net, x) == [("a", "act_a")]
            assert isinstance(net.a, ConvAct2d) and isinstance(net.act_a, nn.Identity)
            assert torch.equal(net(x), ref)  # NCHW input and weights: ConvAct2d runs them as eager PyTorch does
    finally:
        torch.set_num_threads(before)



@needs_onednn
@pytest.mark.slow  # efficientnet-lite0's real weights
def test_efficientnet_lite0_runs_its_relu6s_inside_the_convolutions() -> None:
    enc = create_encoder("efficientnet-lite0", finetune="frozen")
    fused, plain = fuse_for_inference(enc), fuse_for_inference(enc, conv_act=False)
    # every ReLU6: the stem's, the first block's depthwise conv's, the 15 inverted residuals' expansion and
    # depthwise convs', and the head conv's
    assert sum(isinstance(m, nn.ReLU6) for m in plain.modules()) == 1 + 1 + 2 * 15 + 1
    fused_acts = [m.act for m in fused.modules() if isinstance(m, ConvAct2d) and not isinstance(m.act, nn.Identity)]
    assert len(fused_acts) == 1 + 1 + 2 * 15 + 1
    assert sum(isinstance(m, nn.ReLU6) for m in fused.modules()) == len(fused_acts)  # none left on its own
    # and every other conv (the 16 projections after a depthwise conv) on oneDNN alone
    assert sum(isinstance(m, ConvAct2d) for m in fused.modules()) == len(fused_acts) + 16
    assert not any(type(m) in (nn.Conv2d, StaticSameConv2d) for name, m in fused.named_modules()
                   if not name.endswith(".conv"))
    x = torch.randn(5, 3, 224, 224)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # eager PyTorch then runs every one of these convs on oneDNN too
    try:
        with torch.inference_mode():
            a, b = fused({"pixel_values": x}), plain({"pixel_values": x})
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
    with torch.inference_mode(), torch.profiler.profile() as prof:  # one thread: every conv still on the kernel
        fused({"pixel_values": x[:2]})
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("mkldnn::_convolution_pointwise") == 49 and "aten::convolution" not in ops
