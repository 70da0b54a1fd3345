"""Convert between a Lightning ``.ckpt`` of ``FusionTask`` and a fused model folder (both directions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from encoders._atomic import atomic_write
from fusion_errors import CheckpointError, ConfigError

from .checkpoint import save_pretrained
from .config import FusionModelConfig
from .model import FusionModel

__all__ = ["convert_checkpoint", "to_lightning_checkpoint", "convert"]

PREFIX = "model."


def convert_checkpoint(ckpt_path: str | Path, out_dir: str | Path, **card: Any) -> Path:
    """Lightning ``.ckpt`` (``hyper_parameters["config"]`` + ``model.``-prefixed state dict) -> model folder.

    The checkpoint is read with ``torch.load(weights_only=True)``, so no pickled code runs. ``card`` goes to
    :func:`zoo.hub.save_pretrained` (metrics, recipe_command, dataset, notes).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; look under <run_dir>/checkpoints/.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is not a readable Lightning checkpoint ({type(e).__name__}: {e}); "
                              "give a .ckpt written by fusion-zoo fit.") from e
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "config" not in hparams or "state_dict" not in ckpt:
        raise CheckpointError(f"{str(path)!r} has no hyper_parameters['config'] or state_dict; it was not written by "
                              "FusionTask (fusion-zoo fit).")
    try:
        config = FusionModelConfig.from_dict(hparams["config"])
    except ConfigError as e:
        raise ConfigError(f"{path}: hyper_parameters.config: {e}") from e
    state = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    model = FusionModel(config)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: state_dict and config disagree: missing {result.missing_keys[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}; the checkpoint may come from another fusion-zoo release."
        )
    card.setdefault("notes", f"Converted from the Lightning checkpoint {path.name}.")
    return save_pretrained(model.eval(), out_dir, **card)


def to_lightning_checkpoint(folder: str | Path, out_ckpt: str | Path) -> Path:
    """Model folder -> a minimal ``.ckpt`` that ``FusionTask.load_from_checkpoint`` (and ``from_checkpoint``)
    loads for fine-tuning: the full ``model.``-prefixed state dict and ``hyper_parameters`` with ``config``."""
    import pytorch_lightning as pl

    model = FusionModel.from_pretrained(folder)
    out = Path(out_ckpt)
    ckpt = {
        "state_dict": {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": model.config.to_dict(), "labels": list(model.config.labels)},
        "pytorch-lightning_version": pl.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    with atomic_write(out) as tmp:
        torch.save(ckpt, tmp)
    return out


def convert(source: str | Path, output: str | Path) -> Path:
    """A ``.ckpt`` file -> model folder, or a model folder -> ``.ckpt`` (the direction follows ``source``)."""
    src = Path(source)
    if src.is_dir():
        return to_lightning_checkpoint(src, output)
    if src.is_file():
        return convert_checkpoint(src, output)
    raise CheckpointError(f"{str(src)!r} does not exist; give a .ckpt file or a model folder.")
