"""Encoder features for a sweep: every split encoded once through the feature cache, tokens capped.

Features come from :class:`recipes.data.FusionDataModule` (the recipe's ``data:`` section: dataset, columns,
splits, ``max_samples``, ``cache_dir``) with the recipe's frozen encoders, so they are served by
:class:`recipes.cache.FeatureCache` — its key holds the encoder spec and weights hash, the preprocessing, the
dataset fingerprint and the split. A second sweep (or a rerun) reads them from disk without running an encoder.

Token caps (only when a stage needs tokens; the late stage stores pooled vectors alone): image patch tokens are
average-pooled to ``IMAGE_GRID × IMAGE_GRID``, audio frame tokens keep every ``AUDIO_STRIDE``-th frame, text
tokens are kept as they are; pooled vectors never change. The caps are applied by :class:`CappedEncoder` before
the features are stored, and are part of its spec (hence of the cache key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders import Encoder, ModalityOutput, create_encoder

from .train import SplitFeatures


@dataclass
class FeatureSet:
    """Cached features of the train, test and (when the data has one) validation splits for one stage family
    (pooled-only or with tokens). Cells pick their epoch on ``val`` as ``fusion-zoo fit`` picks its checkpoint."""

    train: SplitFeatures
    test: SplitFeatures
    labels: list[str]
    task: str
    info: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)  # modality -> the encoder spec behind the features
    val: SplitFeatures | None = None

    def pooled(self) -> FeatureSet:
        """The same splits with pooled vectors only (what late-stage cells read)."""
        return FeatureSet(pooled_view(self.train), pooled_view(self.test), self.labels, self.task, self.info,
                          self.encoders, pooled_view(self.val) if self.val is not None else None)

__all__ = ["cached_features", "cap_tokens", "pooled_view", "collect", "CappedEncoder", "IMAGE_GRID",
           "AUDIO_STRIDE"]

IMAGE_GRID = 2
AUDIO_STRIDE = 8
ENCODE_BATCH = 512  # large batches: a recurrent audio encoder costs per time step, nearly regardless of batch
IMAGE_CHUNK = 64  # ... while image CNN activations grow with the batch: images are encoded 64 at a time


def cap_tokens(out: ModalityOutput, modality: str) -> ModalityOutput:
    """Fewer tokens for the sweep cache: image patches pooled to a small grid, audio frames strided."""
    b, t, d = out.tokens.shape
    if modality == "image" and t > IMAGE_GRID**2:
        side = int(math.isqrt(t))
        if side * side == t:  # a square patch grid: 2-D average pooling
            grid = out.tokens.reshape(b, side, side, d).permute(0, 3, 1, 2)  # [B, D, S, S]
            tokens = F.adaptive_avg_pool2d(grid, IMAGE_GRID).flatten(2).transpose(1, 2)  # [B, G*G, D]
        else:  # a sequence (e.g. a ViT with a class token): pooled in contiguous chunks
            tokens = F.adaptive_avg_pool1d(out.tokens.transpose(1, 2), IMAGE_GRID**2).transpose(1, 2)
        mask = out.present[:, None].expand(b, tokens.shape[1]).clone()  # [B, G*G]
        return ModalityOutput(tokens * mask[..., None], mask, out.pooled)
    if modality == "audio" and t > AUDIO_STRIDE:
        return ModalityOutput(out.tokens[:, ::AUDIO_STRIDE], out.mask[:, ::AUDIO_STRIDE], out.pooled)
    return out


def pooled_view(split: SplitFeatures) -> SplitFeatures:
    """Pooled vectors only (one token per modality and sample), what the late stage reads."""
    return SplitFeatures({m: ModalityOutput(f.pooled[:, None], f.present[:, None], f.pooled)
                          for m, f in split.feats.items()}, split.labels)


class CappedEncoder(Encoder):
    """A frozen encoder for the sweep cache: tokens capped by :func:`cap_tokens` when ``cap`` is set, and image
    encoders fused for inference (BatchNorm folded, channels-last; same features within 1e-4).

    Its spec records both, so its cache entries never mix with those of the plain encoder; ``weights_hash`` is
    the plain encoder's (the weights it was derived from).
    """

    def __init__(self, inner: Encoder, cap: bool = True) -> None:
        super().__init__()
        self._hash = inner.weights_hash()
        fused = inner.modality == "image"
        if fused:
            from fusion_errors import InputError
            from zoo.optimize import fuse_for_inference

            try:
                inner = cast(Encoder, fuse_for_inference(inner))  # a folded copy of the encoder
            except InputError:  # a norm that cannot be folded exactly: encode with the plain encoder
                fused = False
        self.inner, self.cap = inner, cap
        self.modality = inner.modality  # type: ignore[misc]
        self.embed_dim = inner.embed_dim
        self.preprocessor = inner.preprocessor
        caps = {"image_grid": IMAGE_GRID} if inner.modality == "image" else \
            {"audio_stride": AUDIO_STRIDE} if inner.modality == "audio" else {}
        self.spec = {**(getattr(inner, "spec", None) or {}), "sweep_token_caps": caps if cap else None,
                     "inference_fused": fused}
        self.set_finetune("frozen")

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        n = next(iter(batch.values())).shape[0]
        step = IMAGE_CHUNK if self.modality == "image" else n  # bounded activation memory for CNNs
        parts = []
        for start in range(0, n, step):
            out = self.inner({k: v[start:start + step] for k, v in batch.items()})
            parts.append(cap_tokens(out, self.modality) if self.cap else out)
        return parts[0] if len(parts) == 1 else ModalityOutput(*(torch.cat(x) for x in zip(
            *((p.tokens, p.mask, p.pooled) for p in parts), strict=True)))

    def weights_hash(self) -> str:
        return self._hash


def collect(loader: Iterable[dict[str, Any]]) -> SplitFeatures:
    """Concatenate a cached-feature DataLoader's batches into one :class:`SplitFeatures` (labels kept aligned)."""
    feats: dict[str, list[ModalityOutput]] = {}
    labels = []
    for batch in loader:
        for m, f in batch["inputs"].items():
            feats.setdefault(m, []).append(f)
        labels.append(batch["labels"])
    out = {}
    for m, parts in feats.items():
        t = max(p.tokens.shape[1] for p in parts)
        out[m] = ModalityOutput(torch.cat([F.pad(p.tokens, (0, 0, 0, t - p.tokens.shape[1])) for p in parts]),
                                torch.cat([F.pad(p.mask, (0, t - p.mask.shape[1])) for p in parts]),
                                torch.cat([p.pooled for p in parts]))
    return SplitFeatures(out, torch.cat(labels))


def cached_features(settings: Any, need_tokens: bool) -> Any:
    """The sweep's default feature provider: train and test features of the recipe's encoders and data.

    Encoders are the recipe's ``model.encoders`` (default: each modality the data has, its default encoder), frozen.
    """
    from recipes.data import FusionDataModule
    from recipes.task import DEFAULT_ENCODERS
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    start = time.perf_counter()
    data = {k: v for k, v in settings.data.items() if k not in ("batch_size", "num_workers")}
    dm = FusionDataModule(**data, batch_size=ENCODE_BATCH, cache_features=True)  # the encoding batch on a miss
    # as in `fusion-zoo fit`: with no encoders named, each modality the data has gets its default encoder
    specs = dict(settings.model.get("encoders") or {m: DEFAULT_ENCODERS[m] for m in dm.modalities})
    encoders: dict[str, Encoder] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # randomly initialised encoders (tests, pretrained=False) are the same every sweep
        for m, spec in sorted(specs.items()):
            s: dict[str, Any] = {"name": spec} if isinstance(spec, str) else dict(spec)
            enc = create_encoder(s["name"], finetune="frozen", **dict(s.get("options") or {}))
            # pooled only: the plain encoder, so the entries are the ones `fusion-zoo fit` writes (and reads); the
            # cache folds image encoders itself. With tokens: capped tokens, entries of their own.
            encoders[m] = CappedEncoder(enc, cap=True) if need_tokens else enc
    task: Any = settings.model.get("task") or "multiclass"  # checked by FusionModelConfig
    cfg = FusionModelConfig(encoders=specs, labels=tuple(dm.labels), task=task,
                            stage="early" if need_tokens else "late", fuse_tokens=need_tokens)
    dm.attach(FusionModel(cfg, encoders=encoders))
    train, test = collect(dm.train_dataloader()), collect(dm.test_dataloader())
    val = collect(dm.val_dataloader())  # fit's validation split (or the slice of train it holds out)
    limit = settings.data.get("max_samples")
    source = settings.data.get("data_dir") or settings.data.get("dataset") or "tridigits"  # what the tables name
    info = {"dataset": f"{source}" + (f" (first {limit} rows per split)" if limit else ""),
            "encoders": {m: specs[m] for m in sorted(specs)},
            "source": f"feature cache {dm.cache.root} in {time.perf_counter() - start:.1f}s",
            "token caps": (f"image {IMAGE_GRID}x{IMAGE_GRID} pooled patches, audio every {AUDIO_STRIDE}th frame, "
                           "text as is") if need_tokens else "pooled only"}
    return FeatureSet(train, test, list(dm.labels), task, info, specs, val if len(val) else None)
