"""Named pretrained fused models: folders shipped under ``zoo/pretrained/<name>/`` plus registered sources.

Names read ``<dataset>-<stage>-<head>``, e.g. ``tridigits-late-gating``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

from fusion_errors import RegistryError

__all__ = ["PRETRAINED_DIR", "list_pretrained", "info", "summary", "register_pretrained", "source_of"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REGISTERED: dict[str, dict[str, Any]] = {}


def _shipped() -> dict[str, Path]:
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(PRETRAINED_DIR.iterdir()) if (p / "config.json").is_file()}


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Sorted names of the shipped and registered models, optionally filtered by a shell pattern (``"*-late-*"``)."""
    names = sorted(set(_shipped()) | set(_REGISTERED))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def source_of(name: str) -> str:
    """Where ``name`` lives: a local folder path or ``hf-hub:org/name``."""
    shipped = _shipped()
    if name in shipped:
        return str(shipped[name])
    if name in _REGISTERED:
        return str(_REGISTERED[name]["source"])
    import difflib

    close = difflib.get_close_matches(name, list_pretrained(), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise RegistryError(f"unknown pretrained model {name!r}.{hint} Known: {', '.join(list_pretrained()) or 'none'}.")


def register_pretrained(name: str, source: str | Path, **meta: Any) -> None:
    """Register ``name`` for a folder path or ``hf-hub:org/name`` source; ``meta`` is shown by :func:`info`.

    A name already shipped or registered is an error.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"pretrained name {name!r} must be lowercase letters, digits, '.', '_' or '-'.")
    if name in _shipped() or name in _REGISTERED:
        raise RegistryError(f"pretrained model {name!r} is already registered ({source_of(name)}); "
                            "choose another name.")
    text = str(source)
    if not text.startswith("hf-hub:") and not Path(text).expanduser().is_dir():
        raise RegistryError(f"source {text!r} for {name!r} is neither 'hf-hub:org/name' nor an existing folder.")
    _REGISTERED[name] = {"source": text, **meta}


def info(name: str) -> dict[str, Any]:
    """Name, source, model config, encoders, metrics and card text of ``name`` (remote entries: their ``meta``)."""
    source = source_of(name)
    out: dict[str, Any] = {"name": name, "source": source, **{k: v for k, v in _REGISTERED.get(name, {}).items()
                                                                 if k != "source"}}
    folder = Path(source)
    if source.startswith("hf-hub:") or not (folder / "config.json").is_file():
        return out
    doc = json.loads((folder / "config.json").read_text())
    card = folder / "README.md"
    out.update({
        "model": doc.get("model", {}),
        "encoders": doc.get("encoders", {}),
        "metrics": doc.get("metrics", {}),
        "recipe_command": doc.get("recipe_command"),
        "format_version": doc.get("format_version"),
        "card": card.read_text() if card.is_file() else "",
    })
    return out


def summary(name: str) -> dict[str, Any]:
    """One row of ``fusion-zoo zoo list``: name, data, modalities, stage, head and card test accuracy of ``name``.

    Reads only ``config.json`` (no weights); values a folder does not record (a remote entry) are None.
    """
    source = source_of(name)
    row: dict[str, Any] = {"name": name, "data": _REGISTERED.get(name, {}).get("dataset"), "modalities": None,
                           "stage": None, "head": None, "test_accuracy": None}
    file = Path(source) / "config.json"
    if source.startswith("hf-hub:") or not file.is_file():
        return row
    try:
        doc = json.loads(file.read_text())
        model = doc.get("model") or {}
        fused = ((doc.get("metrics") or {}).get("test") or {}).get("fused") or {}
        row.update(data=doc.get("dataset") or "local data", modalities="+".join(sorted(model.get("encoders") or {})),
                   stage=model.get("stage"), head=model.get("fusion_head"), test_accuracy=fused.get("accuracy"))
    except (ValueError, AttributeError):  # an unreadable folder still lists; `zoo info` gives the error
        pass
    return row
