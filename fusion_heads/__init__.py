"""Interchangeable fusion heads, one per file, registered by name.

Every module here not starting with ``_`` is imported on first use: adding a head is one new file
with a ``@register_fusion_head("name")`` class.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from encoders import Registry

from ._contract import FusionHead, FusionOutput

__all__ = ["FusionHead", "FusionOutput", "register_fusion_head", "create_fusion_head", "list_fusion_heads"]

_REGISTRY: Registry[FusionHead] = Registry("fusion head")
register_fusion_head = _REGISTRY.register
_loaded = False


def _load_heads() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def create_fusion_head(name: str, modality_dims: Mapping[str, int], out_dim: int, **options: Any) -> FusionHead:
    """Build the head registered as ``name`` for ``modality_dims`` (modality -> width), output width ``out_dim``."""
    _load_heads()
    head = _REGISTRY.create(name, modality_dims=dict(modality_dims), out_dim=out_dim, **options)
    head.spec = {"name": name, **options}  # type: ignore[assignment]
    return head


def list_fusion_heads(pattern: str | None = None) -> list[str]:
    """Registered head names, optionally filtered by a shell pattern."""
    _load_heads()
    return _REGISTRY.list(pattern)
