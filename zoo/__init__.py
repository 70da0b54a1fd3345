"""The zoo: fused checkpoints (save/load), named pretrained models, prediction, export and conversion."""

from __future__ import annotations

from .convert import convert_checkpoint, to_lightning_checkpoint
from .export import export, verify_export
from .hub import from_pretrained, push_to_hub, save_pretrained
from .predict import predict
from .registry import info, list_pretrained, load, register_pretrained

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
    "list_pretrained",
    "load",
    "info",
    "register_pretrained",
    "predict",
    "export",
    "verify_export",
    "convert_checkpoint",
    "to_lightning_checkpoint",
]
