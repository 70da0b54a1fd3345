"""Recipe files: where the packaged YAML recipes live and how a ``--config`` value names one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fusion_errors import ConfigError

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "resolve_config", "resolve_config_args", "load_recipe"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Let ``--config NAME`` name a packaged recipe when no file ``NAME`` exists in the working directory."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def resolve_config(value: str) -> str:
    if Path(value).exists() or value.lstrip().startswith(("{", "[")):
        return value
    for candidate in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return value


def load_recipe(path: str | None) -> dict[str, Any]:
    """The ``model``, ``data`` and ``trainer`` sections of a recipe YAML (default: default.yaml)."""
    file = Path(resolve_config(path)) if path else DEFAULT_CONFIG
    if not file.is_file():
        raise ConfigError(f"--config {path!r}: no such recipe file; give a YAML path or a name in recipes/configs/.")
    data = yaml.safe_load(file.read_text()) or {}
    return {"model": dict(data.get("model") or {}), "data": dict(data.get("data") or {}),
            "trainer": dict(data.get("trainer") or {})}
