"""Pretrained text, image and audio encoders behind one contract, registered by name.

Every module in this package that does not start with ``_`` is imported on first use, so adding an
encoder family means adding one file with ``@register_encoder`` factories.
"""

from __future__ import annotations

from typing import Any

from fusion_errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FusionZooError,
    InputError,
    MissingDependencyError,
    RegistryError,
)

from ._contract import FINETUNE_POLICIES, MODALITIES, Encoder, ModalityOutput, Preprocessor
from ._registry import Registry

__all__ = [
    "MODALITIES",
    "FINETUNE_POLICIES",
    "ModalityOutput",
    "Encoder",
    "Preprocessor",
    "Registry",
    "register_encoder",
    "create_encoder",
    "list_encoders",
    "FusionZooError",
    "RegistryError",
    "ConfigError",
    "InputError",
    "DataError",
    "CheckpointError",
    "MissingDependencyError",
]

_REGISTRY: Registry[Encoder] = Registry("encoder", package=__name__)
register_encoder = _REGISTRY.register


def create_encoder(name: str, finetune: str = "frozen", last_n: int = 1, lora_r: int = 8, **kwargs: Any) -> Encoder:
    """Build the encoder registered as ``name`` and apply its fine-tuning policy.

    Args:
        name: a registered name (see ``list_encoders()``), e.g. ``"minilm-l6"``.
        finetune: ``frozen`` (default), ``full``, ``last_n`` or ``lora``.
        last_n: blocks trained under ``last_n``.
        lora_r: LoRA rank under ``lora``.
        **kwargs: the family's typed options (model name, image size, sample rate, ...).
    """
    encoder = _REGISTRY.create(name, **kwargs)
    encoder.spec = {"name": name, **kwargs}  # type: ignore[assignment]
    return encoder.set_finetune(finetune, last_n=last_n, lora_r=lora_r)


def list_encoders(pattern: str | None = None) -> list[str]:
    """Registered encoder names, optionally filtered by a shell pattern such as ``"*audio*"``."""
    return _REGISTRY.list(pattern)
