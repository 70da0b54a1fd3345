"""A convolution and the ReLU/ReLU6 after it as one oneDNN kernel on CPU (:class:`ConvAct2d`), through
``torch.ops.mkldnn._convolution_pointwise``, the private op ``torch.compile`` emits on x86.

The clamp is applied to each output tile while it is still in cache instead of in a second pass, and the kernel is
kept in oneDNN's blocked layout between calls; outputs are bit-identical to the two ops where eager PyTorch runs
oneDNN too. Where the op is missing, nothing is fused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from fusion_errors import InputError

from ._surgery import NORMS, call_on, set_submodule
from .same_pad import StaticSameConv2d

__all__ = ["ConvAct2d", "conv_act_available", "fuse_conv_activations", "unfuse_conv_activations"]


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
    channels-last inputs for it), which is what each chunk worker thread of the feature cache gets; this
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
        otherwise does on every call (what inductor's freezing does; outputs bit-identical). Made again when the
        kernel tensor changes in place; one copy per kernel tensor the conv still holds (a
        :class:`~zoo.same_pad.StaticSameConv2d` has up to four). ``weight`` itself where this torch cannot
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

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, NORMS)]
    hooks = [m.register_forward_hook(on_out) for m in leaves]
    try:
        with torch.no_grad():
            call_on(model, example)
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
        set_submodule(model, conv_name, fused)
        set_submodule(model, act_name, nn.Identity())
        done.append((conv_name, act_name))
    if lone:
        inside = {id(m.conv) for m in model.modules() if isinstance(m, ConvAct2d)}
        for conv_name, conv in list(model.named_modules()):
            if type(conv) in (nn.Conv2d, StaticSameConv2d) and id(conv) not in inside \
                    and conv.weight.is_contiguous(memory_format=torch.channels_last):
                try:
                    set_submodule(model, conv_name, ConvAct2d(cast(nn.Conv2d, conv), None))
                except InputError:
                    continue
                done.append((conv_name, ""))
    return done


def unfuse_conv_activations(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Undo :func:`fuse_conv_activations` ``pairs`` in place: each conv and activation goes back to its place."""
    for conv_name, act_name in pairs:
        fused = cast(ConvAct2d, model.get_submodule(conv_name))
        set_submodule(model, conv_name, fused.conv)
        if act_name:
            set_submodule(model, act_name, fused.act)

