"""Type and range checks of a registered component's options (encoders, fusion heads), before anything is built.

A ``config.json`` is untrusted and a flag may hold a typo, so each option is checked against its factory's type
hint (bool, int, float, str, Literal, list, optional) and every number against the range its name implies
(:data:`OPTION_BOUNDS`: widths, layer / head / expert counts, image sizes, token caps, seconds, probabilities).
``num_layers: 100000`` or ``floor: "high"`` is then one ConfigError naming the option and its range, the same from
a checkpoint as from the command line, instead of minutes of building or a TypeError from inside the factory.
Integers no name covers are bounded by :data:`MAX_INT_OPTION`, lists by :data:`MAX_LIST_ITEMS`, strings by
:data:`MAX_STR_CHARS`; floats must be finite. The cost is linear in the options' size.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from fusion_errors import ConfigError

from ._image_io import MAX_IMAGE_SIZE

__all__ = ["Bound", "OPTION_BOUNDS", "MAX_INT_OPTION", "MAX_LIST_ITEMS", "MAX_STR_CHARS", "MAX_WIDTH",
           "MAX_LAYERS", "check_option_values"]

MAX_WIDTH = 16384  # hidden sizes / model widths: 4x a 7B model's, far above anything trained on one machine
MAX_LAYERS = 64  # layer counts: BERT-large has 24, Whisper-large 32
MAX_INT_OPTION = 1 << 16  # any integer option no name in OPTION_BOUNDS covers
MAX_LIST_ITEMS = 64
MAX_STR_CHARS = 4096


@dataclass(frozen=True)
class Bound:
    """Allowed range of a numeric option: ``lo <= x <= hi`` (``x < hi`` when ``hi_open``)."""

    lo: float
    hi: float
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        return self.lo <= x and (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        return f"[{self.lo:g}, {self.hi:g})" if self.hi_open else f"{self.lo:g}..{self.hi:g}"


_PROBABILITY = Bound(0, 1, hi_open=True)
_SECONDS = Bound(1e-3, 86400)  # sanity only: the audio encoders hold clip lengths to their own, tighter limits
#: option name -> range, for every numeric option a registered encoder or head takes (a list: each item)
OPTION_BOUNDS: dict[str, Bound] = {
    "hidden_size": Bound(1, MAX_WIDTH), "embed_dim": Bound(1, MAX_WIDTH), "d_model": Bound(0, MAX_WIDTH),
    "hidden_dim": Bound(0, MAX_WIDTH), "expert_dim": Bound(0, MAX_WIDTH), "proj_dim": Bound(1, 256),
    "channels": Bound(1, 4096), "num_layers": Bound(0, MAX_LAYERS), "layers": Bound(0, MAX_LAYERS),
    "num_heads": Bound(1, 256), "num_experts": Bound(1, 256), "top_k": Bound(1, 256),
    "num_bottlenecks": Bound(0, 256), "ffn_mult": Bound(1, 16), "rank": Bound(1, 1024),
    "image_size": Bound(4, MAX_IMAGE_SIZE), "thumbnail_size": Bound(4, 128), "n_mels": Bound(1, 512),
    "sample_rate": Bound(1000, 768000), "max_length": Bound(1, 8192), "max_windows": Bound(1, 64),
    "max_seconds": _SECONDS, "window_seconds": _SECONDS, "attention_seconds": _SECONDS,
    "dropout": _PROBABILITY, "floor": _PROBABILITY, "router_noise": Bound(0, 100), "capacity_factor": Bound(0, 64),
    "balance_loss_weight": Bound(0, 1000), "z_loss_weight": Bound(0, 1000),
    "mean": Bound(-10, 10), "std": Bound(1e-6, 10),
}


@functools.lru_cache(maxsize=256)
def _hints(factory: Any) -> dict[str, Any]:
    """The factory's parameter type hints (a class: its ``__init__``'s); empty when they cannot be resolved."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: only the ranges are checked
        return {}


def return_type(factory: Any) -> Any:
    """The class a factory function is annotated to return (None when it does not say)."""
    try:
        return typing.get_type_hints(factory).get("return")
    except Exception:
        return None


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " or ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from JSON or a flag) has the type ``hint`` asks for (unknown hints pass)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return not isinstance(hint, type) or isinstance(value, hint)


def _check_range(where: str, key: str, value: Any) -> None:
    """Numbers (and lists of them) within ``OPTION_BOUNDS[key]``, finite, and integers within MAX_INT_OPTION."""
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_ITEMS:
            raise ConfigError(f"{where}: option {key} has {len(value)} items, above the limit of {MAX_LIST_ITEMS}.")
        for item in value:
            _check_range(where, key, item)
        return
    if isinstance(value, str) and len(value) > MAX_STR_CHARS:
        raise ConfigError(f"{where}: option {key} is a string of {len(value)} characters, above the limit of "
                          f"{MAX_STR_CHARS}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: option {key}={value} must be a finite number.")
    bound = OPTION_BOUNDS.get(key)
    if bound is None and isinstance(value, int):
        bound = Bound(-MAX_INT_OPTION, MAX_INT_OPTION)
    if bound is not None and not bound.holds(value):
        raise ConfigError(f"{where}: option {key}={value} must be in {bound}.")


def check_option_values(kind: str, name: str, factory: Any, options: dict[str, Any]) -> None:
    """Raise ConfigError for the first option of ``name`` (a ``kind``: "encoder", "fusion head") whose value has the
    wrong type for ``factory``'s hint or lies outside its range, naming the option, the value and what is allowed."""
    hints = _hints(factory)
    where = f"{kind} {name!r}"
    for key in sorted(options, key=str):
        value = options[key]
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise ConfigError(f"{where}: option {key}={value!r} must be {_describe(hint)}, not "
                              f"{type(value).__name__}.")
        _check_range(where, str(key), value)
