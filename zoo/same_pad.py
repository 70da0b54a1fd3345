"""TensorFlow "same" padding without copying the input: timm's ``Conv2dSame`` pads every activation it reads with
``F.pad`` before the convolution; :class:`StaticSameConv2d` gives the convolution itself the padding, exactly."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._surgery import set_submodule

__all__ = ["StaticSameConv2d", "static_same_padding"]


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
            set_submodule(model, name, StaticSameConv2d(cast(nn.Conv2d, mod)))
            count += 1
    return count
