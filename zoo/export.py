"""Export a fused model (preprocessed tensors -> logits) to ONNX or TorchScript, with a preprocessing sidecar.

The exported graph takes one flat tensor per ``<modality>.<key>`` of each encoder's preprocessor output, in
sorted order (e.g. ``audio.waveform``, ``audio.present``, ``text.input_ids``, ...), and returns ``logits`` [B, C].
Raw-input preprocessing is not in the graph: ``<out>.preprocessing.json`` records each preprocessor's settings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusion_errors import ConfigError, FusionZooError, InputError, MissingDependencyError

from .model import FusionModel
from .predict import as_items

__all__ = ["ExportError", "FlatFusion", "default_example", "export", "verify_export", "sidecar_path"]

FORMATS = ("onnx", "torchscript")


class ExportError(FusionZooError, RuntimeError):
    """The model cannot be exported to the requested format."""


class FlatFusion(nn.Module):
    """Wraps a :class:`FusionModel` with a flat signature: ``forward(*tensors) -> logits [B, C]``.

    Args:
        model: the fused model.
        names: ``(modality, key)`` of each positional input, in order.
    """

    def __init__(self, model: FusionModel, names: list[tuple[str, str]]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        batch: dict[str, dict[str, Tensor]] = {}
        for (m, key), t in zip(self.names, tensors, strict=True):
            batch.setdefault(m, {})[key] = t
        return self.model(batch).logits  # [B, C]


def default_example(model: FusionModel) -> dict[str, list[Any]]:
    """Two raw samples per modality of ``model`` (used when ``export`` gets no example)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    makers: dict[str, Callable[[], list[Any]]] = {
        "text": lambda: ["an example sentence", "another, longer example sentence for export"],
        "image": lambda: [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)],
        "audio": lambda: [(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000) for _ in range(2)],
    }
    return {m: makers[m]() for m in model.modalities}


def _flatten(model: FusionModel, example: dict[str, Any] | None) -> tuple[list[tuple[str, str]], tuple[Tensor, ...]]:
    raw = default_example(model) if example is None else example
    if all(isinstance(v, dict) for v in raw.values()):
        batch = raw  # already preprocessed
    else:
        batch = model.preprocess(**{m: as_items(m, v) for m, v in raw.items()})
    names = [(m, k) for m in sorted(batch) for k in sorted(batch[m]) if isinstance(batch[m][k], Tensor)]
    if not names:
        raise InputError("the example produced no tensors; give raw inputs such as {'text': ['hello']}.")
    return names, tuple(batch[m][k] for m, k in names)


def _onnx(wrapper: nn.Module, tensors: tuple[Tensor, ...], out: Path, input_names: list[str], opset: int) -> None:
    """TorchScript-based exporter (dynamic batch) first, then the torch.export-based one (static shapes)."""
    errors = []
    dynamic: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*input_names, "logits"]}
    for n, t in zip(input_names, tensors, strict=True):
        if n.startswith("text.") and t.dim() == 2:
            dynamic[n][1] = "text_tokens"
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, tensors, str(out), input_names=input_names, output_names=["logits"],
                                  opset_version=opset, dynamo=dynamo, dynamic_axes=None if dynamo else dynamic)
            return
        except Exception as e:
            errors.append(f"{'dynamo' if dynamo else 'legacy'} exporter: {type(e).__name__}: {str(e).splitlines()[0]}")
    raise ExportError(f"ONNX export failed ({'; '.join(errors)}); an encoder uses an op ONNX cannot express "
                      "(e.g. a complex STFT); try format='torchscript'.")


def _preprocessing(model: FusionModel, modality: str) -> dict[str, Any]:
    encoder: Any = model.encoders[modality]
    return dict(encoder.preprocessor.to_dict())


def sidecar_path(out_path: str | Path) -> Path:
    """``<out>.preprocessing.json`` next to the exported file."""
    out = Path(out_path)
    return out.with_name(out.name + ".preprocessing.json")


def _load(model_or_name: FusionModel | str | Path) -> FusionModel:
    if isinstance(model_or_name, (str, Path)):
        return FusionModel.from_pretrained(model_or_name)
    return model_or_name


def export(model_or_name: FusionModel | str | Path, out_path: str | Path, format: str = "onnx",
           example: dict[str, Any] | None = None, opset: int = 18) -> Path:
    """Export the fused model from preprocessed tensors to logits; returns the written file.

    Args:
        model_or_name: a model, a checkpoint folder or a zoo name.
        out_path: the ``.onnx`` / ``.pt`` file to write (its folder is created).
        format: ``onnx`` or ``torchscript``.
        example: raw inputs (``{"text": [...], ...}``) or a preprocessed batch to trace with; default: two
            synthetic samples per modality.
        opset: ONNX opset version.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}.")
    model = _load(model_or_name).eval()
    names, tensors = _flatten(model, example)
    wrapper = FlatFusion(model, names).eval()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    input_names = [f"{m}.{k}" for m, k in names]
    with torch.no_grad():
        if format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(wrapper, tensors, check_trace=False, strict=False)
            traced.save(str(out))
        else:
            try:
                import onnx  # noqa: F401
            except ImportError as e:
                raise MissingDependencyError("ONNX export needs onnx: pip install onnx") from e
            _onnx(wrapper, tensors, out, input_names, opset)
    sidecar = {
        "format": format,
        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                   for n, t in zip(input_names, tensors, strict=True)],
        "outputs": [{"name": "logits", "labels": list(model.config.labels), "task": model.config.task}],
        "preprocessing": {m: _preprocessing(model, m) for m in sorted({m for m, _ in names}) if m in model.encoders},
        "model": model.config.to_dict(),
    }
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return out


def verify_export(model_or_name: FusionModel | str | Path, path: str | Path, example: dict[str, Any] | None = None,
                  format: str | None = None) -> float:
    """Max absolute difference between the exported file's logits and the eager model's on ``example``."""
    model = _load(model_or_name).eval()
    names, tensors = _flatten(model, example)
    with torch.no_grad():
        eager = FlatFusion(model, names)(*tensors).float()  # [B, C]
    path = Path(path)
    format = format or ("onnx" if path.suffix == ".onnx" else "torchscript")
    if format == "torchscript":
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(*tensors).float()
    else:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("verifying an ONNX export needs onnxruntime: pip install onnxruntime") from e
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        feeds = {f"{m}.{k}": t.numpy() for (m, k), t in zip(names, tensors, strict=True) if f"{m}.{k}" in wanted}
        got = torch.from_numpy(session.run(["logits"], feeds)[0]).float()
    return float((got - eager).abs().max())
