"""Module fusion for inference: BatchNorm folded into convs gives the same outputs (1e-4) with no BN left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders import create_encoder
from fusion_errors import InputError
from zoo.optimize import (
    ConvAct2d,
    StaticSameConv2d,
    conv_act_available,
    count_batchnorms,
    example_image_batch,
    find_foldable_pairs,
    fuse_conv_activations,
    fuse_for_inference,
)

needs_onednn = pytest.mark.skipif(not conv_act_available(), reason="this torch has no oneDNN conv + activation")


def _module_calls(fused: ConvAct2d) -> list[str]:
    """Records each call of ``fused``'s own conv and act modules (the eager path; the oneDNN kernel calls neither)."""
    calls: list[str] = []
    fused.conv.register_forward_hook(lambda *_: calls.append("conv"))
    fused.act.register_forward_hook(lambda *_: calls.append("act"))
    return calls


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
    unfused = fuse_for_inference(model, example=x, conv_act=False)
    assert isinstance(unfused[1], nn.ReLU)
    fused = fuse_for_inference(model, example=x)
    # the BatchNormAct's ReLU either stays a module after the conv or runs inside it (ConvAct2d)
    assert isinstance(fused[1], nn.ReLU) or (isinstance(fused[0], ConvAct2d) and isinstance(fused[0].act, nn.ReLU))
    for out in (unfused, fused):
        with torch.no_grad():
            assert torch.allclose(model(x), out(x), atol=1e-5)
            assert bool((out(x) >= 0).all()) and bool((out(x) == 0).any())


def test_linear_batchnorm1d_and_a_biasless_conv_fold_into_the_layer_itself() -> None:
    """The fold writes new weights into the conv/linear module of the copy; the original model keeps its own."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6))
    _randomise_norms(model)
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
    from zoo.optimize import fold_pairs

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_foldable_pairs(model, torch.randn(1, 3, 4, 4)) == []  # never offered by the pair finder
    with pytest.raises(InputError, match="no running statistics.*unfused"):
        fold_pairs(model, [("0", "1")])


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


# --- StaticSameConv2d: TF "same" padding moved into the convolution (checked against timm's Conv2dSame) ---

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


# --- ConvAct2d: a conv and the ReLU/ReLU6 after it as one oneDNN kernel -----------------------------------------

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
    from zoo.optimize import unfuse_conv_activations

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
def test_a_fused_activation_that_changes_outputs_is_undone_and_the_fold_kept(monkeypatch) -> None:
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
    _randomise_norms(model)
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


# --- GraphEncode: the folded copy run as a frozen TorchScript graph on CPU ---------------------------------------


def _frozen_tiny() -> nn.Module:
    torch.manual_seed(0)
    enc = create_encoder("tiny-image", finetune="frozen").eval()
    _randomise_norms(enc)
    return enc


def _pixels(n: int, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))}


def test_graph_is_built_after_repeated_shapes_and_matches_the_original_at_every_batch_size() -> None:
    from zoo.optimize import GRAPH_AFTER_CALLS, INFERENCE_TAG_GRAPH, GraphEncode, inference_copy

    enc = _frozen_tiny()
    assert inference_copy(enc)[1] == "bnfold-cl"  # the graph is opt-in
    copy_, tag = inference_copy(enc, graph=True)
    assert tag == INFERENCE_TAG_GRAPH and isinstance(copy_.encode, GraphEncode)
    runner = copy_.encode
    key = ((3, 32, 32), torch.float32)
    with torch.inference_mode():
        copy_(_pixels(4))
        assert GRAPH_AFTER_CALLS > 1 and key not in runner._graphs  # one call (a single prediction) builds nothing
        for _ in range(GRAPH_AFTER_CALLS - 1):
            copy_(_pixels(4))
        assert isinstance(runner._graphs[key], torch.jit.ScriptModule)
        for n, seed in ((4, 1), (1, 2), (7, 3), (7, 4)):  # other batch sizes run the same graph
            batch = _pixels(n, seed=seed)
            got, want = copy_(batch), enc(batch)
            assert got.tokens.shape == want.tokens.shape and torch.equal(got.mask, want.mask)
            assert _max_diff(got, want) <= 1e-4
        assert runner._graphs[key] is not None and {b for (_, b) in runner._checked} == {4, 1, 7}
        other = _pixels(2, size=40)  # another image size gets its own graph
        for _ in range(GRAPH_AFTER_CALLS):
            got = copy_(other)
        assert isinstance(runner._graphs[((3, 40, 40), torch.float32)], torch.jit.ScriptModule)
        assert _max_diff(got, enc(other)) <= 1e-4


def test_a_graph_that_fails_to_build_or_to_match_is_dropped_for_eager_runs(monkeypatch) -> None:
    from zoo.optimize import GRAPH_AFTER_CALLS, GraphEncode, inference_copy

    enc = _frozen_tiny()
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    assert isinstance(runner, GraphEncode)
    key = ((3, 32, 32), torch.float32)
    batch = _pixels(3)
    with torch.inference_mode():
        want = enc(batch)

        def broken(*_a, **_k):
            raise RuntimeError("cannot trace")

        monkeypatch.setattr(torch.jit, "trace", broken)
        for _ in range(GRAPH_AFTER_CALLS + 1):
            assert _max_diff(copy_(batch), want) <= 1e-4
        assert key in runner._graphs and runner._graphs[key] is None
        monkeypatch.undo()

        wrong = GraphEncode(inference_copy(enc)[0])  # a graph whose outputs are off by 1
        real_build = wrong._build

        def off_by_one(pixels):
            graph = real_build(pixels)
            return lambda x: tuple(t + 1 if t.is_floating_point() else t for t in graph(x))

        monkeypatch.setattr(wrong, "_build", off_by_one)
        for _ in range(GRAPH_AFTER_CALLS + 2):
            assert _max_diff(wrong(batch), want) <= 1e-4  # the eager result, never the wrong one
        assert wrong._graphs[key] is None


def test_graphs_stay_out_of_grad_mode_export_and_copies() -> None:
    import copy

    from zoo.optimize import GRAPH_AFTER_CALLS, INFERENCE_TAG_FOLDED, GraphEncode, inference_copy

    enc = _frozen_tiny()
    plain_graph = inference_copy(enc)
    assert plain_graph[1] == INFERENCE_TAG_FOLDED and not isinstance(plain_graph[0].encode, GraphEncode)
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    for _ in range(GRAPH_AFTER_CALLS + 1):
        with torch.enable_grad():
            runner(_pixels(2))  # autograd on: the eager encode
    assert runner._graphs == {}
    with torch.inference_mode():
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(_pixels(2))
    assert runner._graphs
    twin = copy.deepcopy(copy_)
    assert isinstance(twin.encode, GraphEncode) and twin.encode.encoder is twin and twin.encode._graphs == {}
    with torch.inference_mode():
        assert _max_diff(twin(_pixels(2, seed=5)), enc(_pixels(2, seed=5))) <= 1e-4


def test_a_graph_is_rebuilt_when_the_encoders_weights_change_in_place() -> None:
    from zoo.optimize import GRAPH_AFTER_CALLS, GraphEncode, inference_copy

    enc = _frozen_tiny()
    copy_ = inference_copy(enc, graph=True)[0]
    runner = copy_.encode
    assert isinstance(runner, GraphEncode)
    batch = _pixels(3)
    with torch.inference_mode():
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(batch)
        first = next(iter(runner._graphs.values()))
        assert first is not None
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(1.5)  # e.g. a user trains or loads new weights into a model served with graphs
    with torch.inference_mode():
        got = copy_(batch)  # not the stale graph's answer
        want = type(copy_).encode(copy_, batch)
        assert _max_diff(got, want) <= 1e-4
        for _ in range(GRAPH_AFTER_CALLS):
            copy_(batch)
        assert next(iter(runner._graphs.values())) is not first


class _RecordingEncoder(nn.Module):
    """Scales each image by 2 and records (thread id, intra-op threads, inference mode) of every call; its
    first ``meet`` calls wait for each other, so they cannot run one after another on one thread."""

    def __init__(self, meet: int = 0) -> None:
        super().__init__()
        import threading

        self.calls: list[tuple[int, int, bool]] = []
        self.meeting = threading.Barrier(meet, timeout=20) if meet else None

    def forward(self, batch: dict[str, torch.Tensor]):
        import threading

        from encoders import ModalityOutput

        self.calls.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        if self.meeting is not None and len(self.calls) <= self.meeting.parties:
            self.meeting.wait()
        pixels = batch["pixel_values"]  # [B, C, H, W]
        pooled = pixels.flatten(1)[:, :4] * 2  # [B, 4]
        return ModalityOutput(pooled[:, None], torch.ones(len(pixels), 1, dtype=torch.bool), pooled)


def test_chunks_run_side_by_side_on_worker_threads_in_order(monkeypatch) -> None:
    import threading

    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 3 * 8 * 8)  # chunks of 3, 3, 3, 1 images
    monkeypatch.setattr(optimize, "CHUNK_WORKERS", 2)
    monkeypatch.setattr(optimize, "_chunk_pools", {})  # a fresh pool: its workers set their own thread counts
    pixels = torch.arange(10 * 3 * 8 * 8, dtype=torch.float32).reshape(10, 3, 8, 8)
    enc = _RecordingEncoder(meet=2)  # the first two chunks must meet: one thread alone would time out
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the workers get 2 each
    seen: list[int] = []
    try:
        with torch.inference_mode():
            out = optimize.run_in_chunks(enc, {"pixel_values": pixels}, "cpu")
        assert torch.get_num_threads() == 4
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.pooled, pixels.flatten(1)[:, :4] * 2, rtol=0, atol=0)  # every row, in order
    assert out.tokens.shape == (10, 1, 4) and out.mask.all()
    assert len(enc.calls) == 4 and len({c[0] for c in enc.calls}) == 2 and threading.get_ident() not in {
        c[0] for c in enc.calls}
    assert all(c[1] == 2 and c[2] for c in enc.calls)  # its share of the caller's 4 threads; the caller's mode
    assert seen == [4]  # a thread started afterwards gets the process's count, not a worker's


def test_chunks_with_grad_or_one_worker_run_on_the_callers_thread(monkeypatch) -> None:
    import threading

    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 3 * 8 * 8)
    pixels = torch.randn(7, 3, 8, 8, requires_grad=True)
    for workers, grad in ((2, True), (1, False)):
        monkeypatch.setattr(optimize, "CHUNK_WORKERS", workers)
        enc = _RecordingEncoder()
        with torch.set_grad_enabled(grad):
            out = optimize.run_in_chunks(enc, {"pixel_values": pixels}, "cpu")
        assert {c[0] for c in enc.calls} == {threading.get_ident()} and len(enc.calls) == 3
        assert out.pooled.requires_grad is grad


def test_a_failing_chunk_raises_in_the_caller(monkeypatch) -> None:
    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 2 * 8 * 8)
    monkeypatch.setattr(optimize, "CHUNK_WORKERS", 2)

    class Broken(_RecordingEncoder):
        def forward(self, batch):
            if float(batch["pixel_values"][0, 0, 0, 0]) == 4:  # the third chunk
                raise InputError("chunk three is broken")
            return super().forward(batch)

    pixels = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 8, 8)
    with torch.no_grad(), pytest.raises(InputError, match="chunk three"):
        optimize.run_in_chunks(Broken(), {"pixel_values": pixels}, "cpu")


def _chunks_in_child(queue) -> None:
    import zoo.optimize as optimize

    optimize.CHUNK_PIXELS, optimize.CHUNK_WORKERS = 2 * 8 * 8, 2
    with torch.no_grad():
        out = optimize.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(6, 3, 8, 8)}, "cpu")
    queue.put(float(out.pooled.sum()))


def test_a_forked_child_gets_its_own_chunk_workers(monkeypatch) -> None:
    import multiprocessing

    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 2 * 8 * 8)
    monkeypatch.setattr(optimize, "CHUNK_WORKERS", 2)
    with torch.no_grad():
        optimize.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(6, 3, 8, 8)}, "cpu")  # pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_chunks_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == 6 * 4 * 2  # the parent's dead pool would hang it


@pytest.mark.slow
def test_efficientnet_chunks_on_workers_equal_one_after_another(monkeypatch) -> None:
    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 2 * 96 * 96)
    enc = create_encoder("efficientnet-lite0", finetune="frozen").eval()
    folded = optimize.inference_copy(enc)[0]
    batch = example_image_batch(enc, batch_size=7, size=96)
    outs = {}
    for workers in (1, 2):
        monkeypatch.setattr(optimize, "CHUNK_WORKERS", workers)
        with torch.inference_mode():
            outs[workers] = (optimize.run_in_chunks(enc, batch, "cpu").pooled,
                             optimize.run_in_chunks(folded, batch, "cpu").pooled)
    for a, b in zip(outs[1], outs[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chunk_pools_are_reused_per_size_and_bounded(monkeypatch) -> None:
    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "CHUNK_PIXELS", 2 * 8 * 8)  # chunks of 2 images
    monkeypatch.setattr(optimize, "CHUNK_WORKERS", 3)
    monkeypatch.setattr(optimize, "_chunk_pools", {})
    threads: dict[int, set[int]] = {}
    with torch.no_grad():
        for images in (4, 6, 4, 6):  # 2 chunks (a pool of 2 workers), then 3 (a pool of 3), twice
            enc = _RecordingEncoder()
            optimize.run_in_chunks(enc, {"pixel_values": torch.ones(images, 3, 8, 8)}, "cpu")
            threads.setdefault(images, set()).update(c[0] for c in enc.calls)
    assert sorted(optimize._chunk_pools) == [(2, 1), (3, 1)]
    assert len(threads[4]) <= 2 and len(threads[6]) <= 3  # the second batches ran on the same pools' threads
    monkeypatch.setattr(optimize, "CHUNK_WORKERS", 8)
    with torch.no_grad():
        for images in range(8, 17, 2):  # pools of 4 .. 8 workers: only the last _CHUNK_POOLS_KEPT stay
            optimize.run_in_chunks(_RecordingEncoder(), {"pixel_values": torch.ones(images, 3, 8, 8)}, "cpu")
    assert sorted(optimize._chunk_pools) == [(5, 1), (6, 1), (7, 1), (8, 1)]


def test_a_pool_dropped_from_the_kept_ones_still_runs_its_callers_chunks(monkeypatch) -> None:
    import zoo.optimize as optimize

    monkeypatch.setattr(optimize, "_chunk_pools", {})
    pool = optimize._workers_pool(2, 1)
    for workers in range(3, 3 + optimize._CHUNK_POOLS_KEPT):  # another caller's pools push it out
        optimize._workers_pool(workers, 1)
    assert (2, 1) not in optimize._chunk_pools
    assert list(pool.map(lambda i: i * 2, range(4))) == [0, 2, 4, 6]  # not shut down under its caller
