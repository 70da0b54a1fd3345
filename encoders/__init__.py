"""Pretrained text, image and audio encoders behind one contract, registered by name.

Every module in this package that does not start with ``_`` is imported on first use, so adding an
encoder family means adding one file with ``@register_encoder`` factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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

F = TypeVar("F", bound=Callable[..., Any])

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
    "default_finetune",
    "FusionZooError",
    "RegistryError",
    "ConfigError",
    "InputError",
    "DataError",
    "CheckpointError",
    "MissingDependencyError",
]

_REGISTRY: Registry[Encoder] = Registry("encoder", package=__name__)
_DEFAULT_FINETUNE: dict[str, str] = {}


def register_encoder(name: str | None = None, *, finetune: str = "frozen") -> Callable[[F], F]:
    """Decorator registering an encoder factory under ``name``.

    ``finetune`` is the policy used when a spec names none: ``frozen`` for pretrained encoders (their features
    are the point), ``full`` for encoders trained from scratch (frozen random weights would be random features).
    """
    if finetune not in FINETUNE_POLICIES:
        raise ConfigError(f"finetune={finetune!r} is not one of {FINETUNE_POLICIES}.")

    def decorator(factory: F) -> F:
        _REGISTRY.register(name)(factory)
        _DEFAULT_FINETUNE[name or factory.__name__] = finetune
        return factory

    return decorator


def default_finetune(name: str) -> str:
    """The fine-tuning policy of encoder ``name`` when none is given (``frozen`` for unknown names)."""
    _ = name in _REGISTRY  # imports the encoder modules once, so their registrations are known
    return _DEFAULT_FINETUNE.get(name, "frozen")


def create_encoder(name: str, finetune: str | None = None, last_n: int = 1, lora_r: int = 8,
                   **kwargs: Any) -> Encoder:
    """Build the encoder registered as ``name`` and apply its fine-tuning policy.

    Args:
        name: a registered name (see ``list_encoders()``), e.g. ``"minilm-l6"``.
        finetune: ``frozen``, ``full``, ``last_n`` or ``lora``; None = the encoder's default
            (:func:`default_finetune`: ``frozen``, except ``full`` for encoders trained from scratch).
        last_n: final blocks trained under ``last_n`` (transformer layers for transformer encoders).
        lora_r: LoRA rank under ``lora``.
        **kwargs: the family's typed options (model name, image size, sample rate, ...).
    """
    encoder = _REGISTRY.create(name, **kwargs)
    encoder.spec = {"name": name, **kwargs}  # type: ignore[assignment]
    return encoder.set_finetune(finetune or default_finetune(name), last_n=last_n, lora_r=lora_r)


def list_encoders(pattern: str | None = None) -> list[str]:
    """Registered encoder names, optionally filtered by a shell pattern such as ``"*audio*"``."""
    return _REGISTRY.list(pattern)
