"""BatchNorm folding: find each ``Conv2d -> BatchNorm2d`` (and ``Linear -> BatchNorm1d``) pair by data flow and
fold the norm's statistics into the layer before it.

Pairs are found in one forward pass with hooks that record which norm reads exactly the tensor a conv wrote, so
the fold does not depend on how a backbone names or orders its submodules. timm's ``BatchNormAct2d`` (a
BatchNorm2d subclass that also applies dropout and an activation) folds the same way and is replaced by its
``drop`` + ``act``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fusion_errors import InputError

from ._surgery import NORMS, call_on, set_submodule

__all__ = ["find_foldable_pairs", "find_pairs_and_output", "fold_pairs", "count_batchnorms"]


def find_foldable_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """``(conv_name, norm_name)`` pairs where the norm's input is exactly the conv's (or linear's) output.

    Runs ``model`` once in eval mode on ``example`` with forward hooks. A conv whose output feeds more than one
    module is skipped (folding would change what the others see).
    """
    return find_pairs_and_output(model, example)[0]


def find_pairs_and_output(model: nn.Module, example: Any) -> tuple[list[tuple[str, str]], Any]:
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
        elif isinstance(mod, NORMS):
            hooks.append(mod.register_forward_pre_hook(on_in))
    was_training = model.training
    model.eval()
    keeper = [m.register_forward_hook(lambda _m, _i, o: kept.append(o)) for m in model.modules()]
    try:
        with torch.no_grad():
            output = call_on(model, example)
    finally:
        for h in hooks + keeper:
            h.remove()
        model.train(was_training)
    pairs = []
    for tid, conv in produced.items():
        mods = list(dict.fromkeys(readers.get(tid, [])))
        if len(mods) == 1 and isinstance(mods[0], NORMS) and mods[0].track_running_stats:
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
        set_submodule(model, norm_name, _norm_replacement(norm))
    return model


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules left (0 after a complete fold of a conv-BN backbone)."""
    return sum(isinstance(m, NORMS) for m in model.modules())
