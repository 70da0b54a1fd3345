"""Inference copies of image encoders: BatchNorm folded (:mod:`zoo.fold`), channels-last weights, TF "same"
padding inside the convolution (:mod:`zoo.same_pad`), convs fused with their ReLU/ReLU6 on oneDNN
(:mod:`zoo.conv_act`), and opt-in TorchScript graphs (:mod:`zoo.graph`), each copy checked against the original.

``inference_copy(encoder)`` is what inference paths call (feature cache, predict, test, export): a folded,
channels-last copy of a *frozen* image encoder plus a short tag for cache keys; anything else comes back as is.
``inference_model(model)`` does the same for every encoder of a fused model, sharing all other modules.
``fuse_for_inference`` is the step underneath, for any module with an example input.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import torch
from torch import Tensor, nn

from encoders import Encoder
from fusion_errors import InputError

from ._surgery import call_on, max_diff
from .conv_act import fuse_conv_activations, unfuse_conv_activations
from .fold import count_batchnorms, find_pairs_and_output, fold_pairs
from .graph import GRAPH_AFTER_CALLS, GraphEncode, graph_available
from .same_pad import static_same_padding

__all__ = ["fuse_for_inference", "example_image_batch", "inference_copy", "inference_model",
           "INFERENCE_TAG_FOLDED", "INFERENCE_TAG_GRAPH", "INFERENCE_TAG_PLAIN"]

INFERENCE_TAG_FOLDED = "bnfold-cl"  # BatchNorm folded into convs, channels-last weights
INFERENCE_TAG_GRAPH = "bnfold-cl-ts"  # folded, channels-last, run on CPU as a frozen TorchScript graph per shape
INFERENCE_TAG_PLAIN = "plain"  # the encoder as trained


def example_image_batch(encoder: Encoder, batch_size: int = 2, size: int = 96) -> dict[str, Tensor]:
    """A preprocessed batch of ``batch_size`` random RGB images (``size`` px) for an image encoder."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    return encoder.preprocessor([Image.fromarray(p) for p in pixels])


def fuse_for_inference(
    model: nn.Module,
    example: Any = None,
    compile: bool = False,
    channels_last: bool = True,
    atol: float = 1e-4,
    inplace: bool = False,
    static_padding: bool = True,
    conv_act: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into the conv/linear layers that feed them.

    Args:
        model: a ``FusionModel`` (its image encoder is fused), an ``Encoder``, or any module (give ``example``).
        example: an input for ``model`` to trace data flow; by default a few random images through the image
            encoder's preprocessor.
        compile: wrap the fused module in ``torch.compile`` (needs a C++ compiler on CPU; first call compiles).
        channels_last: store the fused convolution weights as NHWC (``torch.channels_last``), which CPU
            depthwise/pointwise kernels run much faster; outputs are unchanged up to float rounding.
        atol: largest allowed absolute output difference between fused and original on ``example``.
        inplace: fuse ``model`` itself instead of a deep copy.
        static_padding: run TensorFlow "same" convolutions (timm ``Conv2dSame``) as
            :class:`~zoo.same_pad.StaticSameConv2d`, which pads inside the convolution instead of copying each
            input (exact).
        conv_act: run each conv + ReLU/ReLU6 pair as one oneDNN kernel on CPU (:class:`~zoo.conv_act.ConvAct2d`,
            exact), and with ``channels_last`` every other conv on oneDNN too (``ConvAct2d(conv, None)``); if the
            fused copy then fails its check, this step alone is undone.

    Returns:
        The fused model (a FusionModel keeps its type; only its encoder submodules change).
    """
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    targets: list[tuple[nn.Module, Any]] = []
    if example is not None:
        targets.append((out, example))
    elif isinstance(out, Encoder):
        if out.modality != "image":
            raise InputError(f"no default example for a {out.modality!r} encoder; pass example=<its input batch>.")
        targets.append((out, example_image_batch(out)))
    elif isinstance(encs := getattr(out, "encoders", None), nn.ModuleDict):
        targets += [(e, example_image_batch(cast(Encoder, e))) for e in encs.values()
                    if getattr(e, "modality", "") == "image"]
    else:
        raise InputError(f"pass example=<an input batch> to fuse a {type(out).__name__} (no image encoder found).")
    for target, ex in targets:
        pairs, before = find_pairs_and_output(target, ex)
        fold_pairs(target, pairs)
        if channels_last:
            # nn.Module.to takes memory_format (documented), but its typed overloads leave it out
            target.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if static_padding:
            static_same_padding(target)
        acts = fuse_conv_activations(target, ex, lone=channels_last) if conv_act else []
        with torch.no_grad():
            diff = max_diff(before, call_on(target, ex))
        if diff > atol and acts:  # not expected (ConvAct2d is exact), but never worth losing the fold for
            unfuse_conv_activations(target, acts)
            with torch.no_grad():
                diff = max_diff(before, call_on(target, ex))
        if diff > atol:
            raise InputError(f"fused {type(target).__name__} differs by {diff:.2e} > atol={atol}; "
                             "this module has a non-foldable norm; use it unfused.")
    if compile:
        for target, _ in targets:
            target.forward = torch.compile(target.forward, dynamic=False)  # type: ignore[method-assign]
    return out


def _is_frozen(encoder: nn.Module) -> bool:
    return not any(p.requires_grad for p in encoder.parameters())


def inference_copy(encoder: Encoder, enabled: bool = True, graph: bool = False,
                   graph_after: int = GRAPH_AFTER_CALLS) -> tuple[Encoder, str]:
    """The encoder to run for inference, and a tag naming how it runs (put the tag in cache keys).

    A frozen image encoder with BatchNorms comes back as an eval-mode copy with the norms folded into its
    convolutions and channels-last weights (outputs within 1e-4 of the original, checked on random images):
    tag ``"bnfold-cl"``; with ``graph`` (opt-in, and a torch that has TorchScript) its CPU batches also run as
    :class:`~zoo.graph.GraphEncode` graphs: tag ``"bnfold-cl-ts"``. The graph is not the default: its features
    can differ from the plain encoder's by more than the 1e-4 that inference paths promise (docs/benchmarks.md),
    and its check covers only the first batch of each size. Anything else (trainable,
    no BatchNorm, other modalities, ``enabled=False``, or a fold that fails its check) comes back unchanged with
    tag ``"plain"``. Run the result under ``torch.inference_mode()``. The original encoder is never modified.
    """
    if not enabled or getattr(encoder, "modality", "") != "image" or not _is_frozen(encoder) \
            or count_batchnorms(encoder) == 0:
        return encoder, INFERENCE_TAG_PLAIN
    try:
        folded = fuse_for_inference(encoder, channels_last=True)
    except InputError as e:  # a norm that does not fold exactly: keep the encoder as trained
        warnings.warn(f"inference_copy: {e}", stacklevel=2)
        return encoder, INFERENCE_TAG_PLAIN
    folded.requires_grad_(False)
    if graph and graph_available():
        folded.encode = GraphEncode(cast(Encoder, folded), after=graph_after)  # type: ignore[method-assign,assignment]
        return cast(Encoder, folded), INFERENCE_TAG_GRAPH
    return cast(Encoder, folded), INFERENCE_TAG_FOLDED  # a folded copy of the encoder


def inference_model(model: nn.Module, enabled: bool = True, graph: bool = False
                    ) -> tuple[nn.Module, dict[str, str]]:
    """A fused model whose encoders are :func:`inference_copy` results; every other module is shared.

    Returns ``(model_for_inference, {modality: tag})``. When nothing folds, ``model`` itself comes back.
    """
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise InputError(f"inference_model needs a FusionModel (with .encoders), not a {type(model).__name__}.")
    copies = {m: inference_copy(e, enabled, graph) for m, e in encoders.items()}  # type: ignore[arg-type]
    tags = {m: tag for m, (_, tag) in copies.items()}
    if all(copies[m][0] is encoders[m] for m in copies):
        return model, tags
    out = copy.copy(model)  # shallow: shares parameters and submodules with ``model``
    out._modules = dict(model._modules)  # own table, so swapping encoders leaves ``model`` alone
    out._modules["encoders"] = nn.ModuleDict({m: e for m, (e, _) in copies.items()})
    return out, tags
