"""The fused models: their config, ``FusionModel``, save/load, predict, export, and the zoo of shipped models."""

from __future__ import annotations

from .checkpoint import save_pretrained
from .config import EncoderSpec, FusionModelConfig
from .convert import convert_checkpoint, to_lightning_checkpoint
from .export import export, verify_export
from .hub import from_pretrained, load, push_to_hub
from .model import FusionModel, FusionModelOutput
from .registry import info, list_pretrained, register_pretrained

predict = FusionModel.predict  # zoo.predict(model, text=..., image=..., audio=...)

__all__ = [
    "FusionModel",
    "FusionModelConfig",
    "FusionModelOutput",
    "EncoderSpec",
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
