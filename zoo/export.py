"""Export a fused model (preprocessed tensors -> logits) to ONNX or TorchScript, with a preprocessing sidecar.

The exported graph takes one flat tensor per ``<modality>.<key>`` of each encoder's preprocessor output, in
sorted order (e.g. ``audio.waveform``, ``audio.present``, ``text.input_ids``, ...), and returns ``logits`` [B, C].
Raw-input preprocessing is not in the graph: ``<out>.preprocessing.json`` records each preprocessor's settings
(texts as one window: ``max_windows`` 1, truncated to ``max_length`` tokens).

Shapes: the batch axis of every input, the token axis of 2-D text inputs and the sample axis of audio waveforms
are dynamic (image size is fixed by the preprocessor). Export runs with ``nn.TransformerEncoderLayer``'s fused
fast path switched off (it would otherwise freeze the traced batch size into the graph), and by default on the
inference copy of the model (frozen image encoders BatchNorm-folded, channels-last: ``zoo.optimize``).
``verify_export`` checks the file at a batch size and lengths different from the traced ones.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_errors import ConfigError, FusionZooError, InputError, MissingDependencyError

from ._format import portable_preprocessing
from .model import FusionModel
from .optimize import inference_model
from .predict import as_items

__all__ = ["ExportError", "FlatFusion", "default_example", "verify_example", "export", "verify_export",
           "sidecar_path", "fastpath_disabled"]

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


def default_example(model: FusionModel, n: int = 2, seconds: float = 1.0, words: int = 3,
                    seed: int = 0) -> dict[str, list[Any]]:
    """``n`` synthetic raw samples per modality of ``model`` (used when ``export`` gets no example).

    Texts have about ``words`` words and clips ``seconds`` seconds (the samples' lengths differ a little).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    vocab = ["an", "example", "sentence", "for", "export", "with", "a", "few", "more", "words"]
    makers: dict[str, Callable[[], list[Any]]] = {
        "text": lambda: [" ".join(vocab[(i + j) % len(vocab)] for j in range(words + i)) for i in range(n)],
        "image": lambda: [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)],
        "audio": lambda: [(rng.standard_normal(int(16000 * seconds) - 800 * i).astype(np.float32) * 0.1, 16000)
                          for i in range(n)],
    }
    return {m: makers[m]() for m in model.modalities}


def verify_example(model: FusionModel) -> dict[str, list[Any]]:
    """Raw samples at a batch size (3) and lengths (longer texts, 2.5 s clips) unlike :func:`default_example`."""
    return default_example(model, n=3, seconds=2.5, words=7, seed=1)


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Switch off ``nn.TransformerEncoderLayer`` / ``MultiheadAttention``'s fused fast path for a trace.

    Under ``no_grad`` the fast path runs a fused kernel whose trace bakes in the batch size; the regular path
    traces with dynamic shapes. Outputs are the same up to float rounding.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # older torch: no switch, nothing to do
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


class TraceableAttention(nn.Module):
    """``nn.MultiheadAttention`` (shared weights) written with reshapes that keep every length dynamic in a trace.

    torch's own attention function reshapes keys with the traced key length, so an ONNX graph of cross-attention
    (query and key lengths differ) rejects any other length. Same maths: in-projection, scaled dot-product
    attention with the key-padding / attention masks, out-projection (eval mode: no dropout).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # TransformerEncoderLayer reads batch_first, in_proj_weight, ... of its attention
            return getattr(self._modules["mha"], name)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        m = self.mha
        if not m.batch_first:  # [T, B, D] -> [B, T, D]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        bq, bk, bv = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        heads = m.num_heads
        q = F.linear(query, wq, bq).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, Tq, d]
        k = F.linear(key, wk, bk).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, Tk, d]
        v = F.linear(value, wv, bv).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, Tk, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        if key_padding_mask is not None:
            ignore = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask < 0
            scores = scores.masked_fill(ignore[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # [B, Tq, D]
        out = m.out_proj(out)
        return (out if m.batch_first else out.transpose(0, 1)), None


def traceable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose plain ``nn.MultiheadAttention`` modules are :class:`TraceableAttention`."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, nn.MultiheadAttention) and mod.bias_k is None and not mod.add_zero_attn:
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, TraceableAttention(mod))
    return out.eval()


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


def dynamic_axes(input_names: list[str], tensors: tuple[Tensor, ...]) -> dict[str, dict[int, str]]:
    """Dynamic axes per input: batch everywhere, tokens for 2-D text inputs, samples for audio waveforms."""
    dynamic: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*input_names, "logits"]}
    for n, t in zip(input_names, tensors, strict=True):
        if n.startswith("text.") and t.dim() == 2:
            dynamic[n][1] = "text_tokens"
        if n.startswith("audio.") and t.dim() == 2 and t.is_floating_point():
            dynamic[n][1] = "audio_samples"
    return dynamic


def _onnx(wrapper: nn.Module, tensors: tuple[Tensor, ...], out: Path, input_names: list[str], opset: int) -> None:
    """The TorchScript-based exporter with dynamic batch and lengths (the dynamo one would freeze shapes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tensors, str(out), input_names=input_names, output_names=["logits"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes=dynamic_axes(input_names, tensors))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ExportError(f"ONNX export failed ({type(e).__name__}: {first}); an encoder uses an op ONNX cannot "
                          "express; try format='torchscript'.") from None


def _preprocessing(model: FusionModel, modality: str) -> dict[str, Any]:
    encoder: Any = model.encoders[modality]
    settings = dict(encoder.preprocessor.to_dict())
    if "max_windows" in settings:  # the graph runs each text as one sequence: windows are a PyTorch-side loop
        settings["max_windows"] = 1
    window = getattr(encoder, "window_seconds", None)  # likewise audio: the graph runs one window (Whisper's 30 s)
    if window is not None and settings.get("max_seconds", 0) > window:
        settings["max_seconds"] = float(window)
    return portable_preprocessing(settings)


def sidecar_path(out_path: str | Path) -> Path:
    """``<out>.preprocessing.json`` next to the exported file."""
    out = Path(out_path)
    return out.with_name(out.name + ".preprocessing.json")


def _load(model_or_name: FusionModel | str | Path) -> FusionModel:
    if isinstance(model_or_name, (str, Path)):
        return FusionModel.from_pretrained(model_or_name)
    return model_or_name


def export(model_or_name: FusionModel | str | Path, out_path: str | Path, format: str = "onnx",
           example: dict[str, Any] | None = None, opset: int = 18, fold: bool = True) -> Path:
    """Export the fused model from preprocessed tensors to logits; returns the written file.

    Args:
        model_or_name: a model, a checkpoint folder or a zoo name.
        out_path: the ``.onnx`` / ``.pt`` file to write (its folder is created).
        format: ``onnx`` or ``torchscript``.
        example: raw inputs (``{"text": [...], ...}``) or a preprocessed batch to trace with; default: two
            synthetic samples per modality.
        opset: ONNX opset version.
        fold: export the inference copy (frozen image encoders BatchNorm-folded, channels-last); False exports
            the model as it is.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}.")
    model = _load(model_or_name).eval()
    names, tensors = _flatten(model, example)
    runner = traceable_copy(inference_model(model)[0] if fold else model)
    wrapper = FlatFusion(cast(FusionModel, runner), names).eval()  # a copy of the fused model
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    input_names = [f"{m}.{k}" for m, k in names]
    with torch.no_grad(), fastpath_disabled():
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
    dyn = dynamic_axes(input_names, tensors)
    sidecar = {
        "format": format,
        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "dynamic_axes": {str(k): v for k, v in dyn[n].items()}}
                   for n, t in zip(input_names, tensors, strict=True)],
        "folded": bool(fold),
        "outputs": [{"name": "logits", "labels": list(model.config.labels), "task": model.config.task}],
        "preprocessing": {m: _preprocessing(model, m) for m in sorted({m for m, _ in names}) if m in model.encoders},
        "model": model.config.to_dict(),
    }
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return out


def verify_export(model_or_name: FusionModel | str | Path, path: str | Path, example: dict[str, Any] | None = None,
                  format: str | None = None) -> float:
    """Max absolute difference between the exported file's logits and the eager model's.

    ``example`` defaults to :func:`verify_example`: a batch size and lengths the export did not trace with, so a
    graph that froze a shape fails here. The eager side is the model as loaded (not folded), so the number also
    covers the inference copy's folding.
    """
    model = _load(model_or_name).eval()
    names, tensors = _flatten(model, verify_example(model) if example is None else example)
    with torch.no_grad(), fastpath_disabled():
        eager = FlatFusion(model, names)(*tensors).float()  # [B, C]
    path = Path(path)
    format = format or ("onnx" if path.suffix == ".onnx" else "torchscript")
    if format == "torchscript":
        loaded = torch.jit.load(str(path))
        try:
            with torch.no_grad():
                got = loaded(*tensors).float()
        except Exception as e:
            raise ExportError(f"the TorchScript file fails on inputs {_shapes(names, tensors)} "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}).") from None
    else:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("verifying an ONNX export needs onnxruntime: pip install onnxruntime") from e
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        feeds = {f"{m}.{k}": t.numpy() for (m, k), t in zip(names, tensors, strict=True) if f"{m}.{k}" in wanted}
        try:
            got = torch.from_numpy(session.run(["logits"], feeds)[0]).float()
        except Exception as e:
            raise ExportError(f"onnxruntime fails on inputs {_shapes(names, tensors)} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200]}); the graph froze a shape.") from None
    if got.shape != eager.shape:
        raise ExportError(f"the exported file gives logits {tuple(got.shape)}, eager {tuple(eager.shape)}.")
    return float((got - eager).abs().max())


def _shapes(names: list[tuple[str, str]], tensors: tuple[Tensor, ...]) -> str:
    return ", ".join(f"{m}.{k}{list(t.shape)}" for (m, k), t in zip(names, tensors, strict=True))
