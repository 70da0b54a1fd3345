"""Small helpers the inference rewrites share (fold, same-padding, conv+activation, graph): run a module on an
example input, swap a submodule by its dotted name, and compare two outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from encoders import Encoder

__all__ = ["NORMS", "call_on", "set_submodule", "max_diff"]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)  # the norms a fold removes


def call_on(model: nn.Module, example: Any) -> Any:
    """``model`` run on ``example``: a batch dict for an encoder, a tuple as positional arguments, else one input."""
    if isinstance(example, Mapping) and isinstance(model, Encoder):
        return model(dict(example))
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted, as in ``named_modules``) of ``model`` was."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference of two outputs: tensors, or ``ModalityOutput``s (tokens and pooled)."""
    ta = [a.tokens, a.pooled] if hasattr(a, "pooled") else [a]
    tb = [b.tokens, b.pooled] if hasattr(b, "pooled") else [b]
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb, strict=True) if x.numel())

