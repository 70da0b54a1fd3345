"""Predict from raw inputs: strings, file paths, PIL images, numpy arrays, ``(waveform, rate)`` tuples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from encoders.errors import InputError

if TYPE_CHECKING:
    from recipes.model import FusionModel

__all__ = ["predict", "as_items", "load_image", "load_audio"]

_AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


def load_image(item: Any) -> Any:
    """A path or an [H, W] / [H, W, C] uint8 array -> RGB PIL image; PIL images and tensors pass through."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist; give an existing path or a PIL image.")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as e:
            raise InputError(f"cannot read image {str(path)!r} ({e}); give a PNG/JPEG file or a PIL image.") from e
    if isinstance(item, np.ndarray):  # dtype, shape and NaN checks live in the encoders' loader
        from encoders._image_io import load_image as load_array

        return load_array(item, "image")
    return item


def load_audio(item: Any) -> Any:
    """A path -> ``(mono float32 waveform [N], sample_rate)``; arrays and ``(array, rate)`` tuples pass through."""
    if isinstance(item, (str, Path)):
        import soundfile as sf

        path = Path(item).expanduser()
        if not path.is_file():
            raise InputError(f"audio file {str(path)!r} does not exist; give an existing path or (waveform, rate).")
        try:
            wav, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
        except Exception as e:
            raise InputError(f"cannot read audio {str(path)!r} ({e}); give a WAV/FLAC file or (waveform, rate).") from e
        return wav.mean(axis=1), int(rate)
    return item


def _is_single(modality: str, value: Any) -> bool:
    if isinstance(value, (str, Path)):
        return True
    if modality == "audio" and isinstance(value, tuple) and len(value) == 2 and np.isscalar(value[1]):
        return True
    if isinstance(value, (np.ndarray, Tensor)):
        return modality == "audio" and value.ndim == 1 or modality == "image" and value.ndim in (2, 3)
    return not isinstance(value, Sequence)


def as_items(modality: str, value: Any) -> list[Any] | None:
    """One item or a list of items of ``modality`` -> a list with files loaded (None stays None = missing)."""
    if value is None:
        return None
    items = [value] if _is_single(modality, value) else list(value)
    if modality == "image":
        return [None if x is None else load_image(x) for x in items]
    if modality == "audio":
        return [None if x is None else load_audio(x) for x in items]
    for i, x in enumerate(items):
        if x is not None and not isinstance(x, str):
            raise InputError(f"text item {i} is a {type(x).__name__}; give strings (or None for missing).")
    return items


def _describe(item: Any) -> str:
    if item is None:
        return "missing"
    if isinstance(item, str):
        return repr(item[:40])
    if isinstance(item, tuple):
        return f"waveform of {len(item[0])} samples at {item[1]} Hz"
    return type(item).__name__


def _explain(aux: dict[str, Tensor], modalities: list[str], i: int, b: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in aux.items():
        if key.endswith("_loss") or not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != b:
            continue
        row = value[i].detach().float().cpu()
        if key == "gates" and row.dim() == 1 and row.numel() == len(modalities):
            out[key] = {m: float(w) for m, w in zip(modalities, row, strict=True)}
        else:
            out[key] = row.tolist()
    return out


def _decode(model: FusionModel, logits: Tensor) -> list[dict[str, Any]]:
    cfg = model.config
    labels = list(cfg.labels)
    if cfg.task == "regression":
        return [{"values": dict(zip(labels, map(float, row), strict=True))} for row in logits.float().cpu()]
    if cfg.task == "multilabel":
        probs = logits.float().sigmoid().cpu()  # [B, C]
        return [{"labels": [lab for lab, p in zip(labels, row, strict=True) if p > 0.5],
                 "probs": dict(zip(labels, map(float, row), strict=True))} for row in probs]
    probs = logits.float().softmax(-1).cpu()  # [B, C]
    return [{"label": labels[int(row.argmax())], "probs": dict(zip(labels, map(float, row), strict=True))}
            for row in probs]


@torch.no_grad()
def predict(model: FusionModel, text: Any = None, image: Any = None, audio: Any = None, *,
            batch_size: int = 32) -> list[dict[str, Any]]:
    """Predict from raw inputs of any subset of the model's modalities (at least one).

    Args:
        model: a fused model (put in eval mode).
        text: a string or a list of strings (None items = missing).
        image: a path, PIL image or [H, W, C] array, or a list of them.
        audio: a path, a [N] waveform or a ``(waveform, sample_rate)`` tuple, or a list of them.
        batch_size: samples per forward pass.

    Returns:
        One dict per sample: ``label`` + ``probs`` (multiclass), ``labels`` + ``probs`` (multilabel) or
        ``values`` (regression), plus ``explain`` with the head's gates / routing when it exposes them.
    """
    raw = {m: as_items(m, v) for m, v in (("audio", audio), ("image", image), ("text", text)) if v is not None}
    if not raw:
        raise InputError(f"every modality is missing: give at least one of {model.modalities} (e.g. text='...').")
    unknown = sorted(set(raw) - set(model.modalities))
    if unknown:
        raise InputError(f"this model takes {model.modalities}, not {unknown}; drop those inputs.")
    sizes = {m: len(v) for m, v in raw.items() if v is not None}
    if len(set(sizes.values())) != 1:
        raise InputError(f"inputs have different numbers of samples {sizes}; give each the same count "
                         "(None = missing).")
    n = next(iter(sizes.values()))
    for i in range(n):
        if all(v[i] is None for v in raw.values() if v is not None):
            raise InputError(f"sample {i} has every modality missing; give at least one input for it.")
    model.eval()
    results: list[dict[str, Any]] = []
    for start in range(0, n, batch_size):
        chunk = {m: v[start:start + batch_size] for m, v in raw.items() if v is not None}
        batch = model.preprocess(**chunk)
        device = next(model.parameters()).device
        batch = {m: {k: t.to(device) if isinstance(t, Tensor) else t for k, t in b.items()} for m, b in batch.items()}
        out = model(batch)
        bad = ~torch.isfinite(out.logits).all(dim=-1)  # [B]
        if bad.any():
            i = start + int(bad.nonzero()[0])
            given = {m: _describe(v[i - start]) for m, v in chunk.items()}
            raise InputError(f"the model produced NaN/inf for sample {i} (inputs {given}); check that input "
                             "(empty audio, blank text?) and the model weights.")
        rows = _decode(model, out.logits)
        for j, row in enumerate(rows):
            explain = _explain(out.aux, model.modalities, j, out.logits.shape[0])
            if explain:
                row["explain"] = explain
        results.extend(rows)
    return results
