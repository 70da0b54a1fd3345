"""Module fusion for inference: fold BatchNorm into the convolution (or linear layer) before it.

Optionally the fused convolutions are stored channels-last and the module is wrapped in ``torch.compile``.

``fuse_for_inference(model)`` finds every ``Conv2d -> BatchNorm2d`` (and ``Linear -> BatchNorm1d``) pair by data
flow — one forward pass with hooks records which norm reads exactly the tensor a conv wrote — so the fold does
not depend on how a backbone names or orders its submodules. timm's ``BatchNormAct2d`` (a BatchNorm2d subclass
that also applies dropout and an activation) is folded the same way and replaced by its ``drop`` + ``act``.
The fused copy is checked against the original on the same example input before it is returned.

After the fold, timm's ``Conv2dSame`` (TensorFlow "same" padding, an ``F.pad`` copy of every input before the
conv) becomes a :class:`StaticSameConv2d` that pads inside the convolution, exactly. On this project's 2-core CPU
(EfficientNet-Lite0, 224 px, chunks of 5, interleaved runs) that took the folded encoder from a median of 53 to 58
images/s at 2 threads and 26.5 to 30 at 1 thread; as trained it runs about 24-29 at 2 threads.

Last, each convolution whose output goes straight into a ReLU/ReLU6 runs with the clamp inside it
(:class:`ConvAct2d`: oneDNN's convolution with an activation post-op, the kernel ``torch.compile`` emits on x86),
bit-identical to the two ops (where eager PyTorch runs oneDNN too) and without a second pass over the activation: on
an AVX-512 host, EfficientNet-Lite0 folded at 224 px in chunks of 5 went from 138 to 147 images/s (median of 12
interleaved runs; best 160 -> 167). The other convolutions run on oneDNN too (``ConvAct2d(conv, None)``): on one
thread eager PyTorch would send small batches of 1x1 convolutions to a slower im2col kernel. Each keeps its kernel in
oneDNN's blocked layout between calls (what inductor's freezing does; eager PyTorch reorders the weights on every
call): bit-identical, and on an AVX-512 AMD host 5-10% faster for that encoder (medians 235 -> 258 and 303 -> 322
images/s in two interleaved runs on tridigits); a whole feature-cache miss of 512 easy-VQA images, where decoding
takes a larger share, 221 -> 228 images/s (medians of 5 interleaved misses).

CPU image batches in the feature cache run in chunks (:data:`CHUNK_PIXELS`) side by side on worker threads
(:func:`run_in_chunks`, :data:`CHUNK_WORKERS`).

``inference_copy(encoder)`` is what inference paths call (feature cache, predict, test, export): a folded,
channels-last copy of a *frozen* image encoder plus a short tag for cache keys; anything else comes back as is.
``inference_model(model)`` does the same for every encoder of a fused model, sharing all other modules.

Opt-in (``graph=True``): on CPU the folded copy then runs as a frozen TorchScript graph (``torch.jit.trace`` +
``freeze`` + ``optimize_for_inference``: oneDNN convolutions on blocked layouts, no reorders between layers; the
ReLU6s stay separate ops), one per input shape, built once a shape has been seen :data:`GRAPH_AFTER_CALLS` times
(the feature cache: at once) and checked against the eager folded copy on the first batch of every batch size
(:class:`GraphEncode`). Same 2-core CPU, 224 px, chunks of 5: eager folded 58 images/s, graph 80-85 (plain 23-30);
building the graph takes 0.1-0.15 s. On an AVX-512 host, eager folding with :class:`ConvAct2d` runs as fast as the
graph (146.5 against 145.8 images/s, medians of 12). It is not the default: on easy-VQA images (AVX2 host) its features
differ from the plain encoder's by up to 1.4e-4 (eager folding: 6.6e-5), above the 1e-4 inference paths promise.
``torch.compile`` reached 61 after a 45 s compile. TorchScript is deprecated in torch 2.11; when it is missing or
fails, the eager folded copy runs.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from encoders import Encoder, ModalityOutput
from fusion_errors import InputError

__all__ = ["fuse_for_inference", "fold_pairs", "find_foldable_pairs", "example_image_batch", "count_batchnorms",
           "inference_copy", "inference_model", "StaticSameConv2d", "static_same_padding",
           "INFERENCE_TAG_FOLDED", "INFERENCE_TAG_GRAPH", "INFERENCE_TAG_PLAIN", "CHUNK_PIXELS",
           "GRAPH_AFTER_CALLS", "GraphEncode", "graph_available", "ConvAct2d", "conv_act_available",
           "fuse_conv_activations", "unfuse_conv_activations",
           "cpu_chunk_size", "run_in_chunks", "CHUNK_WORKERS", "chunk_workers"]

INFERENCE_TAG_FOLDED = "bnfold-cl"  # BatchNorm folded into convs, channels-last weights
INFERENCE_TAG_GRAPH = "bnfold-cl-ts"  # folded, channels-last, run on CPU as a frozen TorchScript graph per shape
INFERENCE_TAG_PLAIN = "plain"  # the encoder as trained

#: calls with one input shape before :class:`GraphEncode` builds its graph (a single prediction never pays for one)
GRAPH_AFTER_CALLS = 2
#: distinct input shapes one :class:`GraphEncode` keeps a graph for: each graph holds its own copy of the weights (an
#: image preprocessor makes one size, so one graph is the usual case); further shapes run eagerly
GRAPH_MAX_SHAPES = 2

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def example_image_batch(encoder: Encoder, batch_size: int = 2, size: int = 96) -> dict[str, Tensor]:
    """A preprocessed batch of ``batch_size`` random RGB images (``size`` px) for an image encoder."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    return encoder.preprocessor([Image.fromarray(p) for p in pixels])


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping) and isinstance(model, Encoder):
        return model(dict(example))
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def find_foldable_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """``(conv_name, norm_name)`` pairs where the norm's input is exactly the conv's (or linear's) output.

    Runs ``model`` once in eval mode on ``example`` with forward hooks. A conv whose output feeds more than one
    module is skipped (folding would change what the others see).
    """
    return _pairs_and_output(model, example)[0]


def _pairs_and_output(model: nn.Module, example: Any) -> tuple[list[tuple[str, str]], Any]:
    """:func:`find_foldable_pairs` and the model's output on ``example`` from that same pass (the fold's
    reference: hooks only read, so the output is the unhooked model's)."""
    names = {mod: name for name, mod in model.named_modules()}
    produced: dict[int, nn.Module] = {}
    kept: list[Any] = []  # keep every seen tensor alive so ids stay unique during the pass
    readers: dict[int, list[nn.Module]] = {}
    hooks = []

    def on_out(mod: nn.Module, _inp: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            produced[id(out)] = mod

    def on_in(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        for x in inp:
            if isinstance(x, Tensor):
                kept.append(x)
                readers.setdefault(id(x), []).append(mod)

    for mod in model.modules():
        if not list(mod.children()):  # leaves (a BatchNormAct2d is a leaf: its act is a child only by name)
            hooks.append(mod.register_forward_pre_hook(on_in))
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(on_out))
        elif isinstance(mod, _NORMS):
            hooks.append(mod.register_forward_pre_hook(on_in))
    was_training = model.training
    model.eval()
    keeper = [m.register_forward_hook(lambda _m, _i, o: kept.append(o)) for m in model.modules()]
    try:
        with torch.no_grad():
            output = _call(model, example)
    finally:
        for h in hooks + keeper:
            h.remove()
        model.train(was_training)
    pairs = []
    for tid, conv in produced.items():
        mods = list(dict.fromkeys(readers.get(tid, [])))
        if len(mods) == 1 and isinstance(mods[0], _NORMS) and mods[0].track_running_stats:
            norm = mods[0]
            ok_conv = isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
            ok_lin = isinstance(conv, nn.Linear) and type(norm) is nn.BatchNorm1d
            if (ok_conv or ok_lin) and norm.num_features == (conv.out_channels if ok_conv else conv.out_features):
                pairs.append((names[conv], names[norm]))
    return sorted(pairs), output


def _norm_replacement(norm: nn.Module) -> nn.Module:
    """What stays of a norm after folding: timm's drop + activation for BatchNormAct, else nothing."""
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold each ``(conv, norm)`` pair in place (``model`` must be in eval mode); returns ``model``."""
    for conv_name, norm_name in pairs:
        conv = cast(nn.Conv2d | nn.Linear, model.get_submodule(conv_name))
        norm = model.get_submodule(norm_name)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None \
                or norm.running_var is None:
            raise InputError(f"{norm_name} has no running statistics to fold into {conv_name}; leave this pair out "
                             "of pairs (find_foldable_pairs does) or use the model unfused.")
        fold = fuse_conv_bn_weights if isinstance(conv, nn.Conv2d) else fuse_linear_bn_weights
        # the conv itself gets the folded weights (torch's fuse_*_eval would deep-copy each conv first; the model
        # is already the caller's copy); running stats, eps and affine of any BN subclass
        conv.weight, conv.bias = fold(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                      norm.weight, norm.bias)
        conv.eval().requires_grad_(False)
        _set(model, norm_name, _norm_replacement(norm))
    return model


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one spatial dim: (before, after); ``after`` is ``before`` or one more."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(nn.Conv2d):
    """TensorFlow "same" padding without padding the input (what timm's ``Conv2dSame`` does with an ``F.pad`` copy
    of every activation it reads): a symmetric pad goes to the convolution itself; an asymmetric one (one more
    after than before, dilation 1) becomes symmetric padding of ``after`` with a zero row/column added at the
    kernel's start, which sums exactly the same products. Parameters are shared with the conv it replaces.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, cast(tuple[int, int], conv.kernel_size),
                         cast(tuple[int, int], conv.stride), 0, cast(tuple[int, int], conv.dilation),
                         conv.groups, conv.bias is not None, device="meta")
        self.weight = conv.weight  # shared: [C_out, C_in / groups, kH, kW]
        self.bias = conv.bias  # [C_out] or None
        # the kernel with a zero row (dh) / column (dw) in front, for each asymmetric case an input size can hit;
        # buffers, so they follow .to() and give graph capture a fixed shape, but are never saved
        for dh, dw in sorted({(dh, dw) for dh in self._shifts(0) for dw in self._shifts(1)} - {(0, 0)}):
            shifted = F.pad(conv.weight.detach(), (dw, 0, dh, 0))  # [C_out, C_in / g, kH + dh, kW + dw]
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                shifted = shifted.contiguous(memory_format=torch.channels_last)
            self.register_buffer(f"weight_shift_{dh}{dw}", shifted, persistent=False)

    def _shifts(self, dim: int) -> set[int]:
        """How much longer than before "same" padding is after, over every input size (0 or 1 each)."""
        k, st, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        if d != 1:
            return {0}  # dilated: an asymmetric pad is applied to the input instead
        return {b - a for a, b in (_same_pads(n, k, st, d) for n in range(8 * st, 9 * st))}

    def _pads(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        k, st, d = self.kernel_size, self.stride, self.dilation
        return (_same_pads(int(x.shape[-2]), k[0], st[0], d[0]), _same_pads(int(x.shape[-1]), k[1], st[1], d[1]))

    def kernel_and_padding(self, x: Tensor) -> tuple[Tensor | None, tuple[int, int]]:
        """The kernel and symmetric padding that give "same" output for ``x`` [B, C_in, H, W]; (None, ...) when
        the input itself must be padded (dilated and asymmetric)."""
        (top, bottom), (left, right) = self._pads(x)
        if (bottom > top and self.dilation[0] != 1) or (right > left and self.dilation[1] != 1):
            return None, (0, 0)
        weight = self.weight if (top, left) == (bottom, right) else \
            cast(Tensor, self.get_buffer(f"weight_shift_{bottom - top}{right - left}"))
        return weight, (bottom, right)

    def forward(self, x: Tensor) -> Tensor:  # x [B, C_in, H, W] -> [B, C_out, ceil(H / sH), ceil(W / sW)]
        weight, padding = self.kernel_and_padding(x)
        if weight is None:
            (top, bottom), (left, right) = self._pads(x)
            return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def static_same_padding(model: nn.Module) -> int:
    """Replace every timm ``Conv2dSame`` of ``model`` (in place) by a :class:`StaticSameConv2d` sharing its
    parameters; returns how many. Recognised by name, so ``zoo`` does not import timm."""
    count = 0
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Conv2dSame" and type(mod).__module__.startswith("timm."):
            _set(model, name, StaticSameConv2d(cast(nn.Conv2d, mod)))
            count += 1
    return count


def _post_op(act: nn.Module) -> tuple[str, list[float]] | None:
    """An activation module's oneDNN post-op (name, scalars) for :class:`ConvAct2d`, or None: the clamps only,
    which oneDNN applies exactly (its SiLU/GELU post-ops use their own approximations; those stay separate)."""
    if type(act) is nn.ReLU:
        return "relu", []
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        hardtanh = cast(nn.Hardtanh, act)
        return "hardtanh", [float(hardtanh.min_val), float(hardtanh.max_val)]
    return None


def conv_act_available() -> bool:
    """Whether this torch has oneDNN's convolution with a fused activation (``mkldnn::_convolution_pointwise``,
    the kernel ``torch.compile`` emits on x86 CPUs)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _suggests_channels_last(t: Tensor) -> bool:
    """Whether PyTorch reads a 4-d tensor as channels-last (its ``suggest_memory_format``): channels-last
    contiguous with the channels' stride 1 and the width's the channel count; sizes of 1 can make a tensor
    contiguous both ways, and these strides decide (a 1x1 kernel's weights are either)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and t.stride(1) == 1 \
        and t.stride(3) == t.shape[1] and t.shape[1] * t.shape[2] * t.shape[3] > 1


class ConvAct2d(nn.Module):
    """A convolution and the ReLU/ReLU6 that reads its output (or none: ``act=None``), run as one oneDNN kernel on
    CPU.

    oneDNN applies the clamp to each output tile while it is still in cache (a "post-op") instead of a second pass
    over the whole activation, with the oneDNN convolution eager PyTorch calls for channels-last weights on more
    than one thread: outputs are bit-identical to ``act(conv(x))`` there (checked in tests). On one thread eager
    PyTorch runs small batches of 1x1 convolutions through its own im2col + GEMM kernel instead (and copies
    channels-last inputs for it), which is what a chunk worker thread of :func:`run_in_chunks` would get; this
    module keeps them on oneDNN (the same values up to float rounding). Unless the weights are channels-last and
    the weights or the input read as such (else eager PyTorch runs NCHW kernels), on other devices or dtypes,
    with autograd, or while tracing/exporting (ONNX and TorchScript need standard ops) it runs ``act(conv(x))``
    itself. Installed by :func:`fuse_conv_activations`; ``conv`` and ``act`` stay submodules,
    so weights and ``.to()`` work as before. The kernel is reordered into oneDNN's layout once and kept (one extra
    copy of the weights, not state: never saved, copied or pickled), made again when the weights change.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None) -> None:
        super().__init__()
        post = ("none", []) if act is None else _post_op(act)
        act = nn.Identity() if act is None else act
        if post is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise InputError(f"ConvAct2d fuses a zero-padded Conv2d with ReLU/ReLU6 or none, not {conv} + {act}.")
        self.conv = conv
        self.act = act
        self.attr, self.scalars = post
        # id(kernel) -> (kernel, its version, the kernel in oneDNN's layout); not state: never saved or copied
        self._packed: dict[int, tuple[Tensor, int, Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_packed"] = {}  # oneDNN tensors have no storage to copy or pickle; made again on the next call
        return state

    def _eager(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.act(self.conv(x)))

    def _kernel(self, weight: Tensor, padding: list[int]) -> Tensor:
        """``weight`` reordered once into oneDNN's blocked layout and kept, instead of the reorder the convolution
        otherwise does on every call (EfficientNet-Lite0 folded at 224 px in chunks of 5: 5-10% faster, outputs
        bit-identical). Made again when the kernel tensor changes in place; one copy per kernel tensor the conv
        still holds (a :class:`StaticSameConv2d` has up to four). ``weight`` itself where this torch cannot
        reorder, or for a kernel made under ``inference_mode`` (no version counter to see an in-place change)."""
        if weight.is_inference():  # made under inference_mode: no version counter to tell an in-place change
            return weight
        entry = self._packed.get(id(weight))
        if entry is not None and entry[0] is weight and entry[1] == weight._version:
            return entry[2]
        conv = self.conv
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().contiguous().to_mkldnn(), padding, list(conv.stride), list(conv.dilation),
                conv.groups)  # no input size: one layout for every input (a different one would be reordered)
        except (RuntimeError, NotImplementedError, AttributeError):
            return weight
        # keep only kernels the conv still holds (a replaced weight is let go), then this one; holding ``weight``
        # keeps its id unique
        live = {id(t) for t in (conv.weight, *conv.buffers())}
        self._packed = {k: v for k, v in self._packed.items() if k in live}
        self._packed[id(weight)] = (weight, weight._version, packed)
        return packed

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ConvAct2d:
        self._packed = {}  # .to() / .cuda() / .half() give the conv new tensors: let the old ones go
        return cast(ConvAct2d, super()._apply(fn, recurse))

    def forward(self, x: Tensor) -> Tensor:  # x [B, C_in, H, W] -> act(conv(x)) [B, C_out, H', W']
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 \
                or (torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad)) \
                or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() \
                or torch.onnx.is_in_onnx_export():
            return self._eager(x)
        conv = self.conv
        if isinstance(conv, StaticSameConv2d):
            weight, padding = conv.kernel_and_padding(x)
            if weight is None:  # dilated asymmetric "same" padding: pads the input itself
                return self._eager(x)
        else:
            weight, padding = conv.weight, cast(tuple[int, int], conv.padding)
        if weight.dim() != 4 or not weight.is_contiguous(memory_format=torch.channels_last) \
                or not (_suggests_channels_last(weight) or _suggests_channels_last(x)):
            # eager PyTorch runs NCHW kernels unless the input or the weights are channels-last: keep its numbers
            return self._eager(x)
        return cast(Tensor, torch.ops.mkldnn._convolution_pointwise(
            x, self._kernel(weight, list(padding)), conv.bias, list(padding), list(conv.stride),
            list(conv.dilation), conv.groups, self.attr, self.scalars, ""))


def fuse_conv_activations(model: nn.Module, example: Any, lone: bool = False) -> list[tuple[str, str]]:
    """Replace (in place) each ``Conv2d`` whose output goes straight into a ReLU/ReLU6 module, and to no other
    module, by a :class:`ConvAct2d` (the activation module becomes ``nn.Identity``); with ``lone``, every other
    ``Conv2d`` with channels-last weights too, as ``ConvAct2d(conv, None)`` (oneDNN on any thread count). Returns
    the fused ``(conv_name, act_name)`` pairs, ``act_name`` "" for a lone conv.

    Pairs are found by data flow in one pass over ``example`` (as the BatchNorm fold finds its pairs): the
    activation must be the next module called after the conv and read exactly the conv's output tensor. Callers
    check the result against the original (``fuse_for_inference`` does). A no-op where oneDNN is missing.
    """
    if not conv_act_available():
        return []
    names = {mod: name for name, mod in model.named_modules()}
    order: list[tuple[nn.Module, int | None, int | None]] = []  # leaf calls: (module, input id, output id)
    kept: list[Any] = []  # keep every seen tensor alive so ids stay unique during the pass
    readers: dict[int, int] = {}

    def on_out(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        first = inp[0] if inp and isinstance(inp[0], Tensor) else None
        kept.extend([first, out])
        for x in inp:
            if isinstance(x, Tensor):
                readers[id(x)] = readers.get(id(x), 0) + 1
        order.append((mod, None if first is None else id(first), id(out) if isinstance(out, Tensor) else None))

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, _NORMS)]
    hooks = [m.register_forward_hook(on_out) for m in leaves]
    try:
        with torch.no_grad():
            _call(model, example)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for (conv, _, out), (act, act_in, act_out) in zip(order, order[1:], strict=False):
        # an in-place activation hands on the conv's own tensor, so later readers see the activated values; a
        # new tensor means any other reader of the conv's output would see it without the activation
        only_act = act_out == out or readers.get(cast(int, out)) == 1
        if type(conv) in (nn.Conv2d, StaticSameConv2d) and out is not None and act_in == out and only_act \
                and _post_op(act) is not None and conv in names and act in names:
            pairs.append((names[conv], names[act]))
    done: list[tuple[str, str]] = []
    for conv_name, act_name in dict.fromkeys(pairs):
        conv, act = model.get_submodule(conv_name), model.get_submodule(act_name)
        if isinstance(conv, ConvAct2d) or isinstance(act, nn.Identity):
            continue  # a module called twice: fused on its first pair
        try:
            fused = ConvAct2d(cast(nn.Conv2d, conv), act)
        except InputError:
            continue
        _set(model, conv_name, fused)
        _set(model, act_name, nn.Identity())
        done.append((conv_name, act_name))
    if lone:
        inside = {id(m.conv) for m in model.modules() if isinstance(m, ConvAct2d)}
        for conv_name, conv in list(model.named_modules()):
            if type(conv) in (nn.Conv2d, StaticSameConv2d) and id(conv) not in inside \
                    and conv.weight.is_contiguous(memory_format=torch.channels_last):
                try:
                    _set(model, conv_name, ConvAct2d(cast(nn.Conv2d, conv), None))
                except InputError:
                    continue
                done.append((conv_name, ""))
    return done


def unfuse_conv_activations(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Undo :func:`fuse_conv_activations` ``pairs`` in place: each conv and activation goes back to its place."""
    for conv_name, act_name in pairs:
        fused = cast(ConvAct2d, model.get_submodule(conv_name))
        _set(model, conv_name, fused.conv)
        if act_name:
            _set(model, act_name, fused.act)


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules left (0 after a complete fold of a conv-BN backbone)."""
    return sum(isinstance(m, _NORMS) for m in model.modules())


def _max_diff(a: Any, b: Any) -> float:
    ta = [a.tokens, a.pooled] if hasattr(a, "pooled") else [a]
    tb = [b.tokens, b.pooled] if hasattr(b, "pooled") else [b]
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb, strict=True) if x.numel())


def fuse_for_inference(
    model: nn.Module,
    example: Any = None,
    compile: bool = False,
    channels_last: bool = True,
    atol: float = 1e-4,
    inplace: bool = False,
    static_padding: bool = True,
    conv_act: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into the conv/linear layers that feed them.

    Args:
        model: a ``FusionModel`` (its image encoder is fused), an ``Encoder``, or any module (give ``example``).
        example: an input for ``model`` to trace data flow; by default a few random images through the image
            encoder's preprocessor.
        compile: wrap the fused module in ``torch.compile`` (needs a C++ compiler on CPU; first call compiles).
        channels_last: store the fused convolution weights as NHWC (``torch.channels_last``), which CPU
            depthwise/pointwise kernels run much faster; outputs are unchanged up to float rounding.
        atol: largest allowed absolute output difference between fused and original on ``example``.
        inplace: fuse ``model`` itself instead of a deep copy.
        static_padding: run TensorFlow "same" convolutions (timm ``Conv2dSame``) as :class:`StaticSameConv2d`,
            which pads inside the convolution instead of copying each input (exact).
        conv_act: run each conv + ReLU/ReLU6 pair as one oneDNN kernel on CPU (:class:`ConvAct2d`, exact), and
            with ``channels_last`` every other conv on oneDNN too (``ConvAct2d(conv, None)``); if the fused copy
            then fails its check, this step alone is undone.

    Returns:
        The fused model (a FusionModel keeps its type; only its encoder submodules change).
    """
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    targets: list[tuple[nn.Module, Any]] = []
    if example is not None:
        targets.append((out, example))
    elif isinstance(out, Encoder):
        if out.modality != "image":
            raise InputError(f"no default example for a {out.modality!r} encoder; pass example=<its input batch>.")
        targets.append((out, example_image_batch(out)))
    elif isinstance(encs := getattr(out, "encoders", None), nn.ModuleDict):
        targets += [(e, example_image_batch(cast(Encoder, e))) for e in encs.values()
                    if getattr(e, "modality", "") == "image"]
    else:
        raise InputError(f"pass example=<an input batch> to fuse a {type(out).__name__} (no image encoder found).")
    for target, ex in targets:
        pairs, before = _pairs_and_output(target, ex)
        fold_pairs(target, pairs)
        if channels_last:
            # nn.Module.to takes memory_format (documented), but its typed overloads leave it out
            target.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if static_padding:
            static_same_padding(target)
        acts = fuse_conv_activations(target, ex, lone=channels_last) if conv_act else []
        with torch.no_grad():
            diff = _max_diff(before, _call(target, ex))
        if diff > atol and acts:  # not expected (ConvAct2d is exact), but never worth losing the fold for
            unfuse_conv_activations(target, acts)
            with torch.no_grad():
                diff = _max_diff(before, _call(target, ex))
        if diff > atol:
            raise InputError(f"fused {type(target).__name__} differs by {diff:.2e} > atol={atol}; "
                             "this module has a non-foldable norm; use it unfused.")
    if compile:
        for target, _ in targets:
            target.forward = torch.compile(target.forward, dynamic=False)  # type: ignore[method-assign]
    return out


def graph_available() -> bool:
    """Whether this torch can build :class:`GraphEncode` graphs (TorchScript trace, freeze, optimize)."""
    return all(callable(getattr(torch.jit, name, None)) for name in ("trace", "freeze", "optimize_for_inference"))


class _EncodeTensors(nn.Module):
    """``encoder.encode({"pixel_values": x})`` as a tensor-in, tuple-out module that ``torch.jit.trace`` takes.

    The encoder is held in a list, not as a submodule: the trace then inlines it with its weights as constants
    instead of building a ScriptModule for each of its ~180 submodules (0.1 s to trace EfficientNet-Lite0, not 0.7).
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.held = [encoder]

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # [B, C, H, W] -> tokens, mask, pooled
        encoder = self.held[0]
        out = type(encoder).encode(encoder, {"pixel_values": pixels})  # the class's encode, not GraphEncode
        return out.tokens, out.mask, out.pooled


_GraphKey = tuple[tuple[int, ...], torch.dtype]


class GraphEncode:
    """An image encoder's ``encode`` that runs CPU batches through a frozen, oneDNN-optimized TorchScript graph.

    Installed on a folded inference copy by :func:`inference_copy` (``encoder.encode = GraphEncode(encoder)``).
    A batch that holds only ``pixel_values`` (plus ``present``, which ``Encoder.forward`` applies) on CPU is
    counted by its shape without the batch dim; from the ``after``-th such call on (default
    :data:`GRAPH_AFTER_CALLS`; the feature cache, which runs many batches of one shape, builds at once), it runs a
    graph traced for that shape (graphs take any batch size but bake in the image size). The first batch of each
    batch size is also run eagerly and compared (``atol``); a graph that fails to build or to match is dropped
    for that shape, which then always runs eagerly. Anything else runs the encoder's own ``encode``.
    """

    def __init__(self, encoder: Encoder, atol: float = 1e-4, after: int = GRAPH_AFTER_CALLS) -> None:
        self.encoder = encoder
        self.atol = atol
        self.after = max(1, int(after))
        self._graphs: dict[_GraphKey, Any] = {}  # key -> a ScriptModule, or None when the graph failed
        self._calls: dict[_GraphKey, int] = {}
        self._checked: set[tuple[_GraphKey, int]] = set()
        self._weights: tuple[tuple[int, int], ...] | None = None  # the weights the graphs were built from
        self._lock = threading.Lock()  # a server may call from several threads

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphEncode:
        return GraphEncode(copy.deepcopy(self.encoder, memo), self.atol, self.after)  # graphs hold old weights: rebuild

    def _eager(self, batch: dict[str, Tensor]) -> ModalityOutput:
        return type(self.encoder).encode(self.encoder, batch)

    def _build(self, pixels: Tensor) -> Any:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the deprecation notice and the tracer's shape-to-int notes cannot be acted on by users: the image
            # size is part of the graph's key, and every batch size is checked below
            warnings.simplefilter("ignore")
            example = pixels[:1].clone()  # graphs take any batch size; one image traces fastest
            traced = torch.jit.trace(_EncodeTensors(self.encoder).eval(), example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def _weights_state(self) -> tuple[tuple[int, int], ...] | None:
        """(version, storage) of every weight, or None when one is off the CPU: a graph holds a snapshot of the
        weights, so any in-place change (training, ``load_state_dict``) or move drops the graphs."""
        state = []
        for t in (*self.encoder.parameters(), *self.encoder.buffers()):
            if t.device.type != "cpu":
                return None
            state.append((-1 if t.is_inference() else t._version, t.data_ptr()))  # inference tensors have none
        return tuple(state)

    def __call__(self, batch: dict[str, Tensor]) -> ModalityOutput:
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.device.type != "cpu" \
                or set(batch) - {"pixel_values", "present"} or torch.is_grad_enabled() or not graph_available():
            return self._eager(batch)
        weights = self._weights_state()
        if weights is None:
            return self._eager(batch)
        key: _GraphKey = (tuple(pixels.shape[1:]), pixels.dtype)
        n = int(pixels.shape[0])
        with self._lock:  # decide (and build) under the lock; run outside it
            if weights != self._weights:
                self._graphs, self._calls, self._checked, self._weights = {}, {}, set(), weights
            graph = self._graphs.get(key)
            if key not in self._graphs:
                self._calls[key] = calls = self._calls.get(key, 0) + 1
                if calls >= self.after and len(self._graphs) < GRAPH_MAX_SHAPES:
                    try:
                        graph = self._build(pixels)
                    except Exception:  # noqa: BLE001 - any failure to trace or optimize means: run eagerly
                        graph = None
                    self._graphs[key] = graph
            check = (key, n) not in self._checked
        if graph is None:
            return self._eager(batch)
        try:
            out = ModalityOutput(*graph(pixels))
        except Exception:  # noqa: BLE001 - a graph that cannot run this batch is dropped for its shape
            out = None
        if out is None or check:
            expected = self._eager(batch)
            same = out is not None and all(
                a.shape == b.shape and a.dtype == b.dtype for a, b in
                zip((out.tokens, out.mask, out.pooled), (expected.tokens, expected.mask, expected.pooled), strict=True)
            ) and torch.equal(out.mask, expected.mask) and _max_diff(out, expected) <= self.atol
            with self._lock:
                if out is None or not same:
                    self._graphs[key] = None
                    return expected
                self._checked.add((key, n))
        return out


def _is_frozen(encoder: nn.Module) -> bool:
    return not any(p.requires_grad for p in encoder.parameters())


def inference_copy(encoder: Encoder, enabled: bool = True, graph: bool = False,
                   graph_after: int = GRAPH_AFTER_CALLS) -> tuple[Encoder, str]:
    """The encoder to run for inference, and a tag naming how it runs (put the tag in cache keys).

    A frozen image encoder with BatchNorms comes back as an eval-mode copy with the norms folded into its
    convolutions and channels-last weights (outputs within 1e-4 of the original, checked on random images):
    tag ``"bnfold-cl"``; with ``graph`` (opt-in, and a torch that has TorchScript) its CPU batches also run as
    :class:`GraphEncode` graphs: tag ``"bnfold-cl-ts"``. The graph is not the default: on easy-VQA images its
    features differ from the plain encoder's by up to 1.4e-4 (eager folding: 6.6e-5), above the 1e-4 that
    inference paths promise, and its check covers only the first batch of each size. Anything else (trainable,
    no BatchNorm, other modalities, ``enabled=False``, or a fold that fails its check) comes back unchanged with
    tag ``"plain"``. Run the result under ``torch.inference_mode()``. The original encoder is never modified.
    """
    if not enabled or getattr(encoder, "modality", "") != "image" or not _is_frozen(encoder) \
            or count_batchnorms(encoder) == 0:
        return encoder, INFERENCE_TAG_PLAIN
    try:
        folded = fuse_for_inference(encoder, channels_last=True)
    except InputError as e:  # a norm that does not fold exactly: keep the encoder as trained
        warnings.warn(f"inference_copy: {e}", stacklevel=2)
        return encoder, INFERENCE_TAG_PLAIN
    folded.requires_grad_(False)
    if graph and graph_available():
        folded.encode = GraphEncode(cast(Encoder, folded), after=graph_after)  # type: ignore[method-assign,assignment]
        return cast(Encoder, folded), INFERENCE_TAG_GRAPH
    return cast(Encoder, folded), INFERENCE_TAG_FOLDED  # a folded copy of the encoder


def inference_model(model: nn.Module, enabled: bool = True, graph: bool = False
                    ) -> tuple[nn.Module, dict[str, str]]:
    """A fused model whose encoders are :func:`inference_copy` results; every other module is shared.

    Returns ``(model_for_inference, {modality: tag})``. When nothing folds, ``model`` itself comes back.
    """
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise InputError(f"inference_model needs a FusionModel (with .encoders), not a {type(model).__name__}.")
    copies = {m: inference_copy(e, enabled, graph) for m, e in encoders.items()}  # type: ignore[arg-type]
    tags = {m: tag for m, (_, tag) in copies.items()}
    if all(copies[m][0] is encoders[m] for m in copies):
        return model, tags
    out = copy.copy(model)  # shallow: shares parameters and submodules with ``model``
    out._modules = dict(model._modules)  # own table, so swapping encoders leaves ``model`` alone
    out._modules["encoders"] = nn.ModuleDict({m: e for m, (e, _) in copies.items()})
    return out, tags


#: pixels per image chunk on CPU (64 images of 64 x 64; 5 of 224 x 224): a CNN's early activations for the chunk
#: then stay in the CPU caches instead of streaming through memory. Measured on the 2-core CI CPU, EfficientNet-Lite0
#: at 224 px, 2 threads: batches of 64 ran at 13 images/s plain and 33 folded; chunks of 4 at 39 and 58.
CHUNK_PIXELS = 64 * 64 * 64


def cpu_chunk_size(batch: dict[str, Tensor], device: torch.device | str) -> int | None:
    """Images per chunk for an image batch (``pixel_values`` [B, C, H, W]) run on CPU, or None to run it whole
    (other devices, other modalities, or a batch already at most that size)."""
    pixels = batch.get("pixel_values")
    if torch.device(device).type != "cpu" or not isinstance(pixels, Tensor) or pixels.dim() != 4:
        return None
    chunk = max(1, CHUNK_PIXELS // max(1, pixels.shape[-2] * pixels.shape[-1]))
    return chunk if chunk < pixels.shape[0] else None


#: worker threads that run a CPU batch's chunks side by side, each chunk on its share of torch's intra-op threads
#: (None: one worker per intra-op thread; 1: one chunk after another on all of them). Without grad only. 2-core
#: AVX-512 host, EfficientNet-Lite0 at 224 px in chunks of 5, 2 threads, 256 tridigits images (medians of 4-10
#: interleaved runs): plain 41-43 -> 65 images/s, folded 102-117 -> 114-125.
CHUNK_WORKERS: int | None = None

#: worker pools by (workers, intra-op threads per worker); a batch with fewer chunks than workers uses a smaller
#: pool rather than rebuilding one, and the few pools kept are idle threads
_chunk_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_CHUNK_POOLS_KEPT = 4
_chunk_pool_lock = threading.Lock()


def chunk_workers(chunks: int) -> int:
    """Worker threads for ``chunks`` chunks: :data:`CHUNK_WORKERS` (default: torch's intra-op threads), at most one
    per chunk, 1 while grad is enabled (autograd graphs stay on the caller's thread)."""
    if torch.is_grad_enabled():
        return 1
    wanted = torch.get_num_threads() if CHUNK_WORKERS is None else CHUNK_WORKERS
    return max(1, min(int(wanted), chunks))


def _forget_chunk_pools() -> None:
    _chunk_pools.clear()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_chunk_pools)


def _workers_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads that each run torch ops on ``threads`` intra-op threads (built
    once per such pair, then reused across batches)."""
    with _chunk_pool_lock:
        pool = _chunk_pools.get((workers, threads))
        if pool is not None:
            return pool
        while len(_chunk_pools) >= _CHUNK_POOLS_KEPT:
            # dropped, not shut down: a caller may still be mapping on it; its idle threads exit once it is freed
            _chunk_pools.pop(next(iter(_chunk_pools)))
        total = torch.get_num_threads()
        started = threading.Barrier(workers, timeout=60)  # every setup call waits for the others: one per thread

        def setup() -> None:
            torch.get_num_threads()  # ATen's one-time setup of a new thread first, so it cannot undo the next line
            torch.set_num_threads(threads)  # this thread's OpenMP team size
            started.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="fz-chunks")
        try:
            for done in [pool.submit(setup) for _ in range(workers)]:
                done.result()
        except BaseException:
            pool.shutdown(wait=False)
            raise
        finally:
            # set_num_threads also stores the count that threads started later take: give the caller's back
            torch.set_num_threads(total)
        _chunk_pools[workers, threads] = pool
        return pool


def run_in_chunks(encoder: nn.Module, batch: dict[str, Tensor], device: torch.device | str) -> ModalityOutput:
    """``encoder(batch)``, on CPU image batches in chunks of ``cpu_chunk_size`` images (the same outputs up to
    float rounding, 1.5-3x faster for 224-px CNNs); the chunks' ModalityOutputs are concatenated along the batch.

    Without grad, :func:`chunk_workers` threads run the chunks side by side, each with an equal share of torch's
    intra-op threads (one each on a 2-core CPU): a core then keeps its own chunk's activations in its caches, and
    kernels that scale badly over threads run one per core (the convolutions release the GIL). The encoder's
    forward must be safe to call from several threads at once, as an inference server would."""
    chunk = cpu_chunk_size(batch, device)
    if chunk is None:
        return encoder(batch)
    n = int(batch["pixel_values"].shape[0])
    starts = range(0, n, chunk)

    def run(i: int) -> ModalityOutput:
        return cast(ModalityOutput, encoder({k: v[i:i + chunk] if isinstance(v, Tensor) and v.dim()
                                             and v.shape[0] == n else v for k, v in batch.items()}))

    workers = chunk_workers(len(starts))
    if workers == 1:
        parts = [run(i) for i in starts]
    else:
        pool = _workers_pool(workers, max(1, torch.get_num_threads() // workers))
        inference = torch.is_inference_mode_enabled()

        def run_on_worker(i: int) -> ModalityOutput:
            with torch.inference_mode(inference), torch.no_grad():  # grad modes are per thread
                return run(i)

        parts = list(pool.map(run_on_worker, starts))
    return ModalityOutput(torch.cat([o.tokens for o in parts]), torch.cat([o.mask for o in parts]),
                          torch.cat([o.pooled for o in parts]))  # [B, T, D], [B, T], [B, D]
