"""Pretrained text, image and audio encoders behind one contract, registered by name.

Every module in this package that does not start with ``_`` is imported on first use, so adding an
encoder family means adding one file with ``@register_encoder`` factories.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from fusion_common.registry import Registry
from fusion_errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FusionZooError,
    InputError,
    MissingDependencyError,
    RegistryError,
)

from . import _options
from ._contract import FINETUNE_POLICIES, MODALITIES, Encoder, ModalityOutput, Preprocessor
from ._options import MAX_LAYERS, MAX_WIDTH, OPTION_BOUNDS, check_option_values

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
    "encoder_modality",
    "check_options",
    "check_encoder_options",
    "OPTION_BOUNDS",
    "MAX_WIDTH",
    "MAX_LAYERS",
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


def encoder_modality(name: str) -> str | None:
    """The modality encoder ``name`` encodes, read from its factory's return type without building it (None for
    an unknown name or a factory that does not say)."""
    if name not in _REGISTRY:
        return None
    factory = _REGISTRY.get(name)
    cls = factory if inspect.isclass(factory) else _options.return_type(factory)
    modality = getattr(cls, "modality", None)
    return modality if modality in MODALITIES else None


def check_options(kind: str, name: str, factory: Any, options: dict[str, Any], reserved: tuple[str, ...] = ()) -> None:
    """Raise ConfigError when ``options`` holds keywords ``factory`` does not take, listing the accepted ones, or
    a value of the wrong type or outside its range (``encoders._options``): a typo or a hostile size in a config
    would otherwise be a raw ``TypeError`` from deep inside the build, or minutes of building."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        check_option_values(kind, name, factory, options)
        return
    accepted = [n for n, p in params.items() if n not in reserved and n != "self"
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown {kind} option(s) {unknown} for {name!r}; accepted: {accepted or 'none'}.")
    check_option_values(kind, name, factory, options)


def check_encoder_options(name: str, options: dict[str, Any]) -> None:
    """ConfigError for options encoder ``name`` does not take (nothing is checked for unregistered names)."""
    if name in _REGISTRY:
        check_options("encoder", name, _REGISTRY.get(name), options)


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
    check_options("encoder", name, _REGISTRY.get(name), kwargs)
    encoder = _REGISTRY.create(name, **kwargs)
    encoder.spec = {"name": name, **kwargs}  # type: ignore[assignment]
    return encoder.set_finetune(finetune or default_finetune(name), last_n=last_n, lora_r=lora_r)


def list_encoders(pattern: str | None = None) -> list[str]:
    """Registered encoder names, optionally filtered by a shell pattern such as ``"*audio*"``."""
    return _REGISTRY.list(pattern)
