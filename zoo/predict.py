"""Predict from raw inputs: strings, file paths, PIL images, numpy arrays, ``(waveform, rate)`` tuples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from encoders import ModalityOutput
from fusion_errors import InputError

from .config import FusionModelConfig

__all__ = ["as_items", "decode", "explain", "describe", "check_samples", "drop_modality", "contributions",
           "explain_table"]


def _checked_path(modality: str, item: Any) -> Any:
    """A file path stays a path (decoded in its batch by the encoder's own loader, so predict sees exactly the
    pixels and samples training saw, and a long list of files is never all in memory); a missing file is an
    InputError now, before any model runs. Other items (PIL images, arrays, tensors, ``(waveform, rate)``) pass."""
    if not isinstance(item, (str, Path)):
        return item
    path = Path(item).expanduser()
    if not path.is_file():
        example = "a PIL image" if modality == "image" else "(waveform, rate)"
        raise InputError(f"{modality} file {str(path)!r} does not exist; give an existing path or {example}.")
    return str(path)


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
    if modality in ("image", "audio"):
        return [None if x is None else _checked_path(modality, x) for x in items]
    for i, x in enumerate(items):
        if x is not None and not isinstance(x, str):
            raise InputError(f"text item {i} is a {type(x).__name__}; give strings (or None for missing).")
    return items


def describe(item: Any) -> str:
    if item is None:
        return "missing"
    if isinstance(item, str):
        return repr(item[:40])
    if isinstance(item, tuple):
        return f"waveform of {len(item[0])} samples at {item[1]} Hz"
    return type(item).__name__


def drop_modality(f: ModalityOutput) -> ModalityOutput:
    """``f`` with every sample marked absent (all-False mask): the head then uses its learned missing embedding."""
    return ModalityOutput(f.tokens, torch.zeros_like(f.mask), torch.zeros_like(f.pooled))


def contributions(task: str, full: Tensor, dropped: Tensor) -> Tensor:
    """Leave-one-modality-out change per sample: [B, C] logits with and without a modality -> [B].

    multiclass: probability of the class predicted with every modality, minus that class's probability
    without the modality (positive = the modality supports the prediction; negative = it argues against it).
    multilabel: mean over labels of the absolute change of the sigmoid probabilities. regression: mean absolute
    change of the predicted values.
    """
    full, dropped = full.float(), dropped.float()
    if task == "multiclass":
        top = full.argmax(-1, keepdim=True)  # [B, 1]
        return (full.softmax(-1).gather(-1, top) - dropped.softmax(-1).gather(-1, top)).squeeze(-1)
    if task == "multilabel":
        return (full.sigmoid() - dropped.sigmoid()).abs().mean(-1)
    return (full - dropped).abs().mean(-1)


def _labelled(row: Tensor, names: list[str]) -> dict[str, float] | list[float]:
    if row.dim() == 1 and row.numel() == len(names):
        return {n: float(w) for n, w in zip(names, row, strict=True)}
    return row.tolist()


def explain(aux: dict[str, Tensor], modalities: list[str], i: int, b: int,
            contribution: dict[str, Tensor] | None = None, mix: Tensor | None = None,
            present: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Sample ``i``'s explanation from a forward pass of ``b`` samples.

    Keys: ``contribution`` (each modality the sample has -> leave-one-out change, see :func:`contributions`),
    ``share`` (modality ->
    ``|contribution| / sum of |contribution|``, summing to 1; all 0 when no modality changes the output), the
    head's own per-sample weights (``gates``, ``weights``, ``routing_probs``: per modality when there is one
    weight per modality, else a list, e.g. one routing probability per expert) and ``mix`` (hybrid: the weights of
    the fused and each modality's prediction in the final mix).
    """
    out: dict[str, Any] = {}
    if contribution:  # modalities this sample has (absent ones would always be 0)
        c = {m: float(v[i]) for m, v in contribution.items() if present is None or bool(present[m][i])}
        total = sum(abs(v) for v in c.values())
        out["contribution"] = c
        out["share"] = {m: (abs(v) / total if total > 0 else 0.0) for m, v in c.items()}
    for key, value in aux.items():
        if key.endswith("_loss") or not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != b:
            continue
        out[key] = _labelled(value[i].detach().float().cpu(), modalities)
    if mix is not None:
        out["mix"] = _labelled(mix[i].detach().float().cpu(), ["fused", *modalities])
    return out


def explain_table(explanation: dict[str, Any], modalities: list[str]) -> list[str]:
    """A small text table: one row per modality, columns contribution, share and the head's per-modality weights."""
    cols = [k for k, v in explanation.items() if isinstance(v, dict) and k not in ("contribution", "share")]
    header = f"{'modality':<10}{'contrib':>9}{'share':>7}" + "".join(f"{c[:9]:>10}" for c in cols)
    lines = [header]
    names = list(modalities) + (["fused"] if any("fused" in explanation[c] for c in cols) else [])
    for m in names:
        c, s = explanation.get("contribution", {}).get(m), explanation.get("share", {}).get(m)
        cells = f"{m:<10}" + (f"{c:>+9.3f}" if c is not None else f"{'-':>9}") + \
            (f"{s:>7.2f}" if s is not None else f"{'-':>7}")
        cells += "".join(f"{explanation[k][m]:>10.3f}" if m in explanation[k] else f"{'-':>10}" for k in cols)
        lines.append(cells)
    for k, v in explanation.items():
        if isinstance(v, list):
            lines.append(f"{k}: " + ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v))
    return lines


def decode(cfg: FusionModelConfig, logits: Tensor) -> list[dict[str, Any]]:
    """[B, C] logits -> one result dict per sample (label + probs, labels + probs, or values by task)."""
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


def check_samples(raw: dict[str, list[Any] | None], modalities: list[str]) -> int:
    """Validate a predict call's inputs (known modalities, equal counts, no all-missing sample); return the count."""
    if not raw:
        raise InputError(f"every modality is missing: give at least one of {modalities} (e.g. text='...').")
    unknown = sorted(set(raw) - set(modalities))
    if unknown:
        raise InputError(f"this model takes {modalities}, not {unknown}; drop those inputs.")
    sizes = {m: len(v) for m, v in raw.items() if v is not None}
    if len(set(sizes.values())) != 1:
        raise InputError(f"inputs have different numbers of samples {sizes}; give each the same count "
                         "(None = missing).")
    n = next(iter(sizes.values()))
    for i in range(n):
        if all(v[i] is None for v in raw.values() if v is not None):
            raise InputError(f"sample {i} has every modality missing; give at least one input for it.")
    return n
