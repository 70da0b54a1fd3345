"""Module fusion for inference: fold BatchNorm into the convolution (or linear layer) before it.

Optionally the fused convolutions are stored channels-last and the module is wrapped in ``torch.compile``.

``fuse_for_inference(model)`` finds every ``Conv2d -> BatchNorm2d`` (and ``Linear -> BatchNorm1d``) pair by data
flow — one forward pass with hooks records which norm reads exactly the tensor a conv wrote — so the fold does
not depend on how a backbone names or orders its submodules. timm's ``BatchNormAct2d`` (a BatchNorm2d subclass
that also applies dropout and an activation) is folded the same way and replaced by its ``drop`` + ``act``.
The fused copy is checked against the original on the same example input before it is returned.

After the fold, each convolution becomes a :class:`FoldedConv2d`: TensorFlow "same" padding (timm's
``Conv2dSame``, which pads every input with ``F.pad`` before the conv) is turned into the conv's own symmetric
padding (an asymmetric pad becomes one more zero row/column at the start of the kernel: the same sums, no padded
copy of the activation), and a ReLU/ReLU6 that is the only reader of the conv's output is applied by the
convolution itself on CPU (oneDNN's fused post-op) instead of a second pass over the activation. On this project's
2-core CPU (EfficientNet-Lite0, 224 px, chunks of 5, 8 interleaved runs) that took the folded encoder from a median
of 61 to 64 images/s (best 73 to 81); as trained it runs about 29.

``inference_copy(encoder)`` is what inference paths call (feature cache, predict, test, export): a folded,
channels-last copy of a *frozen* image encoder plus a short tag for cache keys; anything else comes back as is.
``inference_model(model)`` does the same for every encoder of a fused model, sharing all other modules.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from encoders import Encoder, ModalityOutput
from fusion_errors import InputError

__all__ = ["fuse_for_inference", "fold_pairs", "find_foldable_pairs", "example_image_batch", "count_batchnorms",
           "inference_copy", "inference_model", "FoldedConv2d", "fuse_conv_epilogues",
           "INFERENCE_TAG_FOLDED", "INFERENCE_TAG_PLAIN", "CHUNK_PIXELS",
           "cpu_chunk_size", "run_in_chunks"]

INFERENCE_TAG_FOLDED = "bnfold-cl"  # BatchNorm folded into convs, channels-last weights
INFERENCE_TAG_PLAIN = "plain"  # the encoder as trained

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
            _call(model, example)
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
    return sorted(pairs)


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
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        fold: Callable[..., nn.Module] = fuse_conv_bn_eval if isinstance(conv, nn.Conv2d) else fuse_linear_bn_eval
        fused = fold(conv.eval(), norm.eval())  # reads running stats, eps and affine of any BN subclass
        fused.requires_grad_(False)
        _set(model, conv_name, fused)
        _set(model, norm_name, _norm_replacement(norm))
    return model


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one spatial dim: (before, after); ``after`` is ``before`` or one more."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _tracing() -> bool:
    """True while a graph is being captured (TorchScript, ONNX, torch.compile/export): use plain ATen ops there."""
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def _pointwise_conv_op() -> Any:
    """oneDNN's convolution with a fused post-op (private ATen op, CPU only), or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


_POINTWISE_CONV = _pointwise_conv_op()


class FoldedConv2d(nn.Conv2d):
    """An inference-only convolution (parameters shared with the conv it replaces) that can

    - compute TensorFlow "same" padding itself (``same=True``, what timm's ``Conv2dSame`` does with an ``F.pad``
      copy of every input): symmetric padding goes to the conv; an asymmetric one (one more after than before)
      becomes symmetric padding of ``after`` with a zero row/column added at the kernel's start, which sums the
      same products without copying the input;
    - apply the activation that followed it (``act`` ``"relu"`` or ``"hardtanh"`` with ``act_scalars`` min, max):
      on CPU float32 outside graph capture as oneDNN's fused post-op, elsewhere as the plain op after the conv.
    """

    def __init__(self, conv: nn.Conv2d, same: bool = False) -> None:
        pad = 0 if same else cast(tuple[int, int], conv.padding)
        super().__init__(conv.in_channels, conv.out_channels, cast(tuple[int, int], conv.kernel_size),
                         cast(tuple[int, int], conv.stride), pad, cast(tuple[int, int], conv.dilation),
                         conv.groups, conv.bias is not None, device="meta")
        self.weight = conv.weight  # shared, frozen: [C_out, C_in / groups, kH, kW]
        self.bias = conv.bias  # [C_out] or None
        self.same = same
        self.act = "none"
        self.act_scalars: list[float] = []
        if same:  # the kernel with a zero row (dh) / column (dw) in front, for each asymmetric case an input can hit
            for dh, dw in sorted({(dh, dw) for dh in self._shifts(0) for dw in self._shifts(1)} - {(0, 0)}):
                shifted = F.pad(conv.weight.detach(), (dw, 0, dh, 0))  # [C_out, C_in / g, kH + dh, kW + dw]
                if conv.weight.is_contiguous(memory_format=torch.channels_last):
                    shifted = shifted.contiguous(memory_format=torch.channels_last)
                self.register_buffer(f"weight_shift_{dh}{dw}", shifted, persistent=False)

    def _shifts(self, dim: int) -> set[int]:
        """How much longer than before "same" padding gets after, over every input size (0 or 1 each)."""
        k, st, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        if d != 1:
            return {0}  # dilated: an asymmetric pad is applied to the input instead
        return {b - a for a, b in (_same_pads(n, k, st, d) for n in range(8 * st, 9 * st))}

    def set_activation(self, act: nn.Module) -> None:
        """Take over ``act`` (an ``nn.ReLU`` or ``nn.Hardtanh``/``nn.ReLU6``) as this conv's epilogue."""
        if isinstance(act, nn.Hardtanh):
            self.act, self.act_scalars = "hardtanh", [float(act.min_val), float(act.max_val)]
        elif isinstance(act, nn.ReLU):
            self.act, self.act_scalars = "relu", []
        else:
            raise InputError(f"FoldedConv2d cannot apply a {type(act).__name__}; only ReLU and Hardtanh/ReLU6.")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", same=True" if self.same else "") + \
            (f", act={self.act}{self.act_scalars or ''}" if self.act != "none" else "")

    def _weight_padding(self, x: Tensor) -> tuple[Tensor, tuple[int, int], Tensor]:
        """(weight, symmetric padding, input) for ``x`` [B, C, H, W]: the input is padded only where an asymmetric
        "same" padding cannot be moved into the kernel (dilation > 1)."""
        if not self.same:
            return self.weight, cast(tuple[int, int], self.padding), x
        k, st, d = self.kernel_size, self.stride, self.dilation
        (th, bh), (lw, rw) = (_same_pads(int(x.shape[-2]), k[0], st[0], d[0]),
                              _same_pads(int(x.shape[-1]), k[1], st[1], d[1]))
        if (bh > th and d[0] != 1) or (rw > lw and d[1] != 1):
            return self.weight, (0, 0), F.pad(x, (lw, rw, th, bh))
        if (th, lw) == (bh, rw):
            return self.weight, (th, lw), x
        weight = cast(Tensor, getattr(self, f"weight_shift_{bh - th}{rw - lw}"))  # a buffer: fixed shape
        return weight, (bh, rw), x

    def forward(self, x: Tensor) -> Tensor:  # x [B, C_in, H, W] -> [B, C_out, H', W']
        weight, padding, x = self._weight_padding(x)
        if self.act != "none" and _POINTWISE_CONV is not None and x.device.type == "cpu" \
                and x.dtype == torch.float32 and not _tracing() \
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return cast(Tensor, _POINTWISE_CONV(x, weight, self.bias, list(padding), list(self.stride),
                                                list(self.dilation), self.groups, self.act, self.act_scalars, ""))
        y = F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if self.act == "relu":
            return F.relu(y, inplace=True)  # y is this call's own tensor
        if self.act == "hardtanh":
            return F.hardtanh(y, self.act_scalars[0], self.act_scalars[1], inplace=True)
        return y


def _is_same_conv(mod: nn.Module) -> bool:
    """timm's ``Conv2dSame`` (TF "same" padding computed per input), recognised without importing timm."""
    return type(mod).__name__ == "Conv2dSame" and type(mod).__module__.startswith("timm.")


def fuse_conv_epilogues(model: nn.Module, example: Any) -> list[tuple[str, nn.Module]]:
    """Turn each plain ``nn.Conv2d`` (and timm ``Conv2dSame``) of ``model`` into a :class:`FoldedConv2d`, in place,
    and hand it the ReLU/ReLU6 that reads its output, found by data flow on ``example`` like the BatchNorm pairs.

    An activation is taken over only when it runs once per forward, its input is that conv's output, and nothing
    read that output before it (after an in-place activation, later readers see the activated tensor either way).
    Returns ``(name, original_module)`` for every replaced module, so a caller can undo the change.
    """
    replaced: list[tuple[str, nn.Module]] = []
    for name, mod in list(model.named_modules()):
        plain = type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
        if plain or _is_same_conv(mod):
            _set(model, name, FoldedConv2d(cast(nn.Conv2d, mod), same=_is_same_conv(mod)))
            replaced.append((name, mod))
    names = {mod: name for name, mod in model.named_modules()}
    produced: dict[int, FoldedConv2d] = {}
    readers: dict[int, list[nn.Module]] = {}
    calls: dict[nn.Module, list[int]] = {}
    kept: list[Any] = []
    hooks = []

    def on_out(mod: nn.Module, _inp: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            kept.append(out)
            produced[id(out)] = cast(FoldedConv2d, mod)

    def on_in(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        ids = [id(x) for x in inp if isinstance(x, Tensor)]
        kept.extend(x for x in inp if isinstance(x, Tensor))
        calls.setdefault(mod, []).extend(ids[:1])
        for i in ids:
            readers.setdefault(i, []).append(mod)

    for mod in model.modules():
        if isinstance(mod, FoldedConv2d):
            hooks.append(mod.register_forward_hook(on_out))
        if not list(mod.children()):
            hooks.append(mod.register_forward_pre_hook(on_in))
    try:
        with torch.no_grad():
            _call(model, example)
    finally:
        for h in hooks:
            h.remove()
    for tid, conv in produced.items():
        order = readers.get(tid, [])
        act = order[0] if order else None
        if not isinstance(act, (nn.ReLU, nn.Hardtanh)) or len(calls.get(act, [])) != 1 or conv.act != "none":
            continue
        if len(order) > 1 and not getattr(act, "inplace", False):
            continue  # another module reads the conv's raw output
        conv.set_activation(act)
        replaced.append((names[act], act))
        _set(model, names[act], nn.Identity())
    return replaced


def _restore(model: nn.Module, replaced: list[tuple[str, nn.Module]]) -> None:
    for name, original in reversed(replaced):
        _set(model, name, original)


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
    epilogues: bool = True,
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
        epilogues: also turn the convolutions into :class:`FoldedConv2d` (static "same" padding, the following
            ReLU/ReLU6 fused), kept only if the outputs still match within ``atol``.

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
        with torch.no_grad():
            before = _call(target, ex)
        fold_pairs(target, find_foldable_pairs(target, ex))
        if channels_last:
            # nn.Module.to takes memory_format (documented), but its typed overloads leave it out
            target.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        replaced = fuse_conv_epilogues(target, ex) if epilogues else []
        with torch.no_grad():
            diff = _max_diff(before, _call(target, ex))
            if diff > atol and replaced:  # e.g. an activation's input also read outside modules: keep the fold only
                _restore(target, replaced)
                diff = _max_diff(before, _call(target, ex))
        if diff > atol:
            raise InputError(f"fused {type(target).__name__} differs by {diff:.2e} > atol={atol}; "
                             "this module has a non-foldable norm; use it unfused.")
    if compile:
        for target, _ in targets:
            target.forward = torch.compile(target.forward, dynamic=False)  # type: ignore[method-assign]
    return out


def _is_frozen(encoder: nn.Module) -> bool:
    return not any(p.requires_grad for p in encoder.parameters())


def inference_copy(encoder: Encoder, enabled: bool = True) -> tuple[Encoder, str]:
    """The encoder to run for inference, and a tag naming how it runs (put the tag in cache keys).

    A frozen image encoder with BatchNorms comes back as an eval-mode copy with the norms folded into its
    convolutions and channels-last weights (outputs within 1e-4 of the original, checked on random images):
    tag ``"bnfold-cl"``. Anything else (trainable, no BatchNorm, other modalities, ``enabled=False``, or a fold
    that fails its check) comes back unchanged with tag ``"plain"``. Run the result under
    ``torch.inference_mode()``. The original encoder is never modified.
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
    return cast(Encoder, folded), INFERENCE_TAG_FOLDED  # a folded copy of the encoder


def inference_model(model: nn.Module, enabled: bool = True) -> tuple[nn.Module, dict[str, str]]:
    """A fused model whose encoders are :func:`inference_copy` results; every other module is shared.

    Returns ``(model_for_inference, {modality: tag})``. When nothing folds, ``model`` itself comes back.
    """
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise InputError(f"inference_model needs a FusionModel (with .encoders), not a {type(model).__name__}.")
    copies = {m: inference_copy(e, enabled) for m, e in encoders.items()}  # type: ignore[arg-type]
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


def run_in_chunks(encoder: nn.Module, batch: dict[str, Tensor], device: torch.device | str) -> ModalityOutput:
    """``encoder(batch)``, on CPU image batches in chunks of ``cpu_chunk_size`` images (the same outputs up to
    float rounding, 1.5-3x faster for 224-px CNNs); the chunks' ModalityOutputs are concatenated along the batch."""
    chunk = cpu_chunk_size(batch, device)
    if chunk is None:
        return encoder(batch)
    n = int(batch["pixel_values"].shape[0])
    parts = [encoder({k: v[i:i + chunk] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
                      for k, v in batch.items()}) for i in range(0, n, chunk)]
    return ModalityOutput(torch.cat([o.tokens for o in parts]), torch.cat([o.mask for o in parts]),
                          torch.cat([o.pooled for o in parts]))  # [B, T, D], [B, T], [B, D]
