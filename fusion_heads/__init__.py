"""Interchangeable fusion heads, one per file, registered by name.

Every module here not starting with ``_`` is imported on first lookup (``Registry(package=...)``):
adding a head is one new file
with a ``@register_fusion_head("name")`` class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from encoders import check_options
from fusion_common import Registry

from ._contract import FusionHead, FusionOutput

__all__ = ["FusionHead", "FusionOutput", "register_fusion_head", "create_fusion_head", "list_fusion_heads"]

_REGISTRY: Registry[FusionHead] = Registry("fusion head", package=__name__)
register_fusion_head = _REGISTRY.register


def create_fusion_head(name: str, modality_dims: Mapping[str, int], out_dim: int, **options: Any) -> FusionHead:
    """Build the head registered as ``name`` for ``modality_dims`` (modality -> width), output width ``out_dim``.

    Unknown options, and option values of the wrong type or outside their range, are a ConfigError before the
    head is built (``encoders.check_options``)."""
    check_options("fusion head", name, _REGISTRY.get(name), options, reserved=("modality_dims", "out_dim"))
    head = _REGISTRY.create(name, modality_dims=dict(modality_dims), out_dim=out_dim, **options)
    head.spec = {"name": name, **options}  # type: ignore[assignment]
    return head


def list_fusion_heads(pattern: str | None = None) -> list[str]:
    """Registered head names, optionally filtered by a shell pattern."""
    return _REGISTRY.list(pattern)
