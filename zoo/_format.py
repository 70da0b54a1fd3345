"""Low-level pieces of the fused checkpoint folder: versions, migrations, weights splitting, atomic writes.

A checkpoint folder holds ``config.json``, ``model.safetensors`` and ``README.md`` (docs/checkpoints.md).
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion_common import atomic_folder as _atomic_folder
from fusion_errors import CheckpointError

__all__ = [
    "portable_preprocessing",
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
    "register_migration",
    "migrate",
    "stored_mode",
    "is_lora_key",
    "reference_hash",
    "weights_to_save",
    "expected_keys",
    "library_versions",
    "atomic_folder",
]

CHECKPOINT_FORMAT = 1  # version of the folder layout / config.json wrapper
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_migration(from_version: int) -> Callable[[Callable[[dict[str, Any]], dict[str, Any]]], Any]:
    """Decorator: register a function turning a ``config.json`` dict of ``from_version`` into ``from_version + 1``."""

    def decorator(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        _MIGRATIONS[from_version] = fn
        return fn

    return decorator


@register_migration(0)
def _from_v0(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (pre-release) config.json was the bare FusionModelConfig dict, with no encoder records."""
    model = {k: v for k, v in doc.items() if k != "format_version"}
    model["format_version"] = 1  # written with the version-1 model defaults (zoo.config._V1_DEFAULTS)
    return {"format_version": 1, "model": model, "encoders": {}, "metrics": {}}


def migrate(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring a ``config.json`` dict up to :data:`CHECKPOINT_FORMAT`, or raise naming the version needed."""
    version = doc.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{where}: format_version={version!r} must be a non-negative int; re-save the model.")
    if "model" not in doc and version >= 1:
        raise CheckpointError(f"{where}: no 'model' section; re-save it with model.save_pretrained().")
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where} uses checkpoint format_version {version}, newer than this fusion-zoo reads "
            f"(up to {CHECKPOINT_FORMAT}); install a fusion-zoo that reads format {version}: pip install -U fusion-zoo."
        )
    while version < CHECKPOINT_FORMAT:
        if version not in _MIGRATIONS:
            raise CheckpointError(f"{where}: no migration from format_version {version}; "
                                  "re-save it with an older release.")
        doc = _MIGRATIONS[version](doc)
        version = doc["format_version"]
    return doc


def stored_mode(encoder: nn.Module | None, spec: Any = None) -> str:
    """How an encoder's weights go into model.safetensors: ``reference`` | ``lora`` | ``full``.

    A frozen (or LoRA) encoder goes by reference only when rebuilding it from ``spec`` gives the same weights
    (same sha256); random-init encoders and changed weights are stored in full.
    """
    if encoder is None:
        return "reference"
    policy = getattr(encoder, "finetune", "full")
    lora = policy == "lora" and any(is_lora_key(k) for k in encoder.state_dict())
    if policy != "frozen" and not lora:
        return "full"
    mode = "lora" if lora else "reference"
    if spec is not None and reference_hash(encoder, mode) != _fresh_hash(spec, mode):
        return "full"
    return mode


def _fresh_hash(spec: Any, mode: str) -> str | None:
    """sha256 of the encoder ``spec`` builds from the registry now (the global RNG is left untouched)."""
    from encoders import create_encoder

    with torch.random.fork_rng(devices=[]):
        try:
            fresh = create_encoder(spec.name, finetune=spec.finetune, last_n=spec.last_n, lora_r=spec.lora_r,
                                   **spec.options)
        except Exception:  # not rebuildable here: keep the weights
            return None
    return reference_hash(fresh, mode)


def is_lora_key(key: str) -> bool:
    """True for peft adapter parameters (``lora_A``, ``lora_B``, ``lora_embedding_*``, ...)."""
    return "lora_" in key


def _hash_state(state: dict[str, Tensor]) -> str:
    """sha256 over names, shapes and bytes, the same recipe as ``Encoder.weights_hash``."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def reference_hash(encoder: nn.Module, mode: str) -> str:
    """Hash of the weights a checkpoint does not store: all of them (``reference``), the base ones (``lora``)."""
    if mode == "lora":
        return _hash_state({k: v for k, v in encoder.state_dict().items() if not is_lora_key(k)})
    return encoder.weights_hash()  # type: ignore[operator]


def _keep(key: str, modes: dict[str, str]) -> bool:
    parts = key.split(".", 2)
    if parts[0] != "encoders" or len(parts) < 3:
        return True
    mode = modes.get(parts[1], "full")
    return mode == "full" or (mode == "lora" and is_lora_key(parts[2]))


def weights_to_save(model: nn.Module, modes: dict[str, str]) -> dict[str, Tensor]:
    """The model's state dict minus the encoder weights stored by reference (own, contiguous CPU copies)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items() if _keep(k, modes)}


def expected_keys(model: nn.Module, modes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape that model.safetensors must hold for ``model`` under the storage ``modes``."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if _keep(k, modes)}


def portable_preprocessing(settings: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor's settings as written into a model folder or export sidecar: a path inside an installed
    package (a tokenizer shipped in a pip wheel) is recorded from its package folder on (``pkg/model``), not as
    this machine's absolute ``.../site-packages/pkg/model``, which names a folder outside the model's and means
    nothing on another machine. Other values are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, str) and Path(value).is_absolute():
            parts = Path(value).parts
            for marker in ("site-packages", "dist-packages"):
                if marker in parts:
                    value = Path(*parts[len(parts) - parts[::-1].index(marker):]).as_posix()
                    break
        out[key] = value
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint (for the record, not checked on load)."""
    out = {"python": platform.python_version()}
    for dist in ("fusion-zoo", "torch", "safetensors", "transformers", "timm", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it replaces ``target`` whole
    (:func:`fusion_common.atomic_folder`), so an interrupted save leaves the old checkpoint or the new one.

    Refuses a ``target`` that is a file, or a non-empty folder that is not a checkpoint (no ``config.json``), so a
    save never deletes a folder of other files.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{str(target)!r} is a file; save_pretrained needs a folder path.")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"refusing to replace {str(target)!r}: it is not empty and holds no {CONFIG_FILE}; "
            "choose a new or empty folder."
        )
    with _atomic_folder(target) as tmp:
        yield tmp
