"""``FusionModel``: encoders + fusion head + task head, at an early, late or hybrid stage.

A plain ``nn.Module`` (no Lightning inside) built from one :class:`FusionModelConfig`.
What each stage computes is written down in docs/stages.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from encoders import Encoder, ModalityOutput
from fusion_errors import ConfigError, InputError, RegistryError
from fusion_heads import FusionHead, create_fusion_head

from . import predict as _predict
from .checkpoint import build_encoder, check_modality, load_checkpoint, save_pretrained
from .config import FusionModelConfig
from .optimize import inference_model

__all__ = ["FeatureNorm", "FusionModel", "FusionModelOutput"]


@dataclass
class FusionModelOutput:
    """Output of :meth:`FusionModel.forward`.

    Attributes:
        logits: [B, C] final prediction (logits for classification, values for regression).
        fused: [B, D] the fused representation.
        modality_logits: modality -> [B, C] per-modality predictions (late and hybrid stages).
        present: modality -> [B] bool, which samples had the modality after modality dropout.
        aux: the head's auxiliary losses (``*_loss``) and diagnostics.
        units: the head side's unit activations, layer -> [B, W] (``FusionModel.unit_widths``), after the unit
            masks: what the modular objectives regulate and decomposition masks (docs/modularity.md).
    """

    logits: Tensor
    fused: Tensor
    modality_logits: dict[str, Tensor] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)
    aux: dict[str, Tensor] = field(default_factory=dict)
    units: dict[str, Tensor] = field(default_factory=dict)

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the head's auxiliary losses (a scalar; 0 when there are none)."""
        losses = [v for k, v in self.aux.items() if k.endswith("_loss")]
        return torch.stack(losses).sum() if losses else self.logits.new_zeros(())


class _UnitHook:
    """Forward hook that makes an activation module's output a unit layer of ``owner``: the output times the
    layer's unit mask, recorded in ``owner``'s units of the running ``fuse`` call. A plain object (not a closure)
    so that a deep copy of the model hooks the copy, not the original."""

    def __init__(self, owner: FusionModel, layer: str, routed: bool = False) -> None:
        self.owner = owner
        self.layer = layer
        self.routed = routed  # sees the rows routed to it (a mixture-of-experts expert), not one row a sample

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        out = self.owner._mask(self.layer, output)
        sink, rows = self.owner.__dict__.get("_unit_sink"), self.owner.__dict__.get("_unit_rows")
        if sink is not None:
            calls = sum(1 for k in sink if k.split(".")[0] == self.layer)
            if out.dim() == 2 and calls == 0 and out.shape[0] == rows and not self.routed:
                sink[self.layer] = out  # [B, W]
            elif out.dim() == 3:  # [B, S, W]: the first slot (the trunk's fused vector) for the objectives,
                if calls == 0:  # every slot for decomposition
                    sink[self.layer] = out[:, 0]
                sink[f"{self.layer}.tokens{calls}"] = out
            else:  # a later call, or rows routed to this module only (a mixture-of-experts expert)
                sink[f"{self.layer}.call{calls}"] = out
        return out


def _hidden_activations(head: nn.Module) -> list[tuple[nn.Module, int, bool]]:
    """The fusion head's hidden activation modules (GELU / ReLU right after a Linear in a Sequential), their
    widths and whether they see routed rows (inside ``experts``): the head's hidden unit layers."""
    found: list[tuple[nn.Module, int, bool]] = []
    for name, module in head.named_modules():
        if isinstance(module, nn.Sequential):
            kids = list(module)
            for prev, act in zip(kids, kids[1:], strict=False):
                if isinstance(act, (nn.GELU, nn.ReLU)) and isinstance(prev, nn.Linear):
                    found.append((act, int(prev.out_features), "experts" in name.split(".")))
    return found


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class _Trunk(nn.Module):
    """Shared trunk after the head: pre-norm transformer layers over ``[fused; head tokens]``.

    Heads without tokens give a one-token sequence, where each layer reduces to a residual
    value-projection plus a residual MLP; one code path keeps every parameter in use (plain DDP works).
    """

    def __init__(self, dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        heads = 4 if dim % 4 == 0 else 1
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        for layer in self.layers:  # the MLP's ReLU as a module, so that it can be a unit layer (a hook masks it);
            layer.activation = nn.ReLU()  # the fused inference path would skip the hook: always the module path
            cast(Any, layer).activation_relu_or_gelu = 0
        self.norm = nn.LayerNorm(dim)

    def forward(self, fused: Tensor, tokens: Tensor | None, token_mask: Tensor | None) -> Tensor:
        seq = fused[:, None]  # [B, 1, D]
        keep = torch.ones_like(seq[..., 0], dtype=torch.bool)  # [B, 1]
        if tokens is not None:
            if token_mask is None:
                token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            seq = torch.cat([seq, tokens], dim=1)  # [B, 1+T, D]
            keep = torch.cat([keep, token_mask], dim=1)  # [B, 1+T]
        for layer in self.layers:
            seq = layer(seq, src_key_padding_mask=~keep)
        return self.norm(seq[:, 0])  # [B, D]


class FeatureNorm(nn.Module):
    """Per-modality standardisation of encoder features with statistics of the pooled training features.

    Each dimension is centred on its training mean, and the modality is scaled by one number: the root mean square
    of its centred features. Modalities arrive at one scale (encoders differ by orders of magnitude) while each
    keeps the relative scale of its own dimensions: dividing every dimension by its own deviation blows up
    near-constant dimensions (speaker traits in a speech encoder's features, docs/recipes.md).

    Buffers (saved in ``model.safetensors``): ``mean`` [D], ``std`` [D] (the one scale, per dimension so that the
    layout can hold per-dimension scales) and ``fitted`` (whether the statistics were set; until then the module is
    the identity). Absent samples stay all-zero: the head replaces them with its learned missing embedding.
    """

    mean: Tensor
    std: Tensor
    fitted: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, pooled: Tensor, present: Tensor, chunk: int = 16384) -> None:
        """Set the statistics from pooled features [N, D] of the rows where ``present`` [N] is True."""
        self.fit_chunks(lambda: ((pooled[s:s + chunk], present[s:s + chunk]) for s in range(0, pooled.shape[0], chunk)))

    def fit_chunks(self, chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        """The same from ``chunks()``, (pooled [c, D], present [c]) row chunks read twice (sums, then squared
        deviations from the mean, in float64): memory stays one chunk whatever N, so a memory-mapped feature store
        is read, never copied whole."""
        total: Tensor | None = None
        n = 0
        for x, keep in chunks():
            part = x[keep].double().sum(0)  # [D]
            total = part if total is None else total + part
            n += int(keep.sum())
        if total is None or n < 2:
            return
        mean = total / n  # [D]
        squares = sum(float((x[keep].double() - mean).pow(2).sum()) for x, keep in chunks())
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.fill_(max(1e-6, (squares / (n * mean.numel())) ** 0.5))
        self.fitted.fill_(True)

    def forward(self, f: ModalityOutput) -> ModalityOutput:
        mean, std = self.mean.to(f.pooled.dtype), self.std.to(f.pooled.dtype)
        pooled = ((f.pooled - mean) / std) * f.present[:, None].to(f.pooled.dtype)  # [B, D]
        tokens = ((f.tokens - mean) / std) * f.mask[..., None].to(f.tokens.dtype)  # [B, T, D]
        return ModalityOutput(tokens, f.mask, pooled)


class FusionModel(nn.Module):
    """Encoders (``ModuleDict``) + a fusion head + task heads, wired by ``config.stage``.

    Args:
        config: the full model config.
        encoders: pre-built encoders by modality (default: built from ``config.encoders``).
        embed_dims: modality -> width, to build a head-only model that runs on cached features (no encoders).
    """

    #: composed models only (``config.modules``): the parts, and per output column [C] the position among the
    #: parts' concatenated scores and the calibration scale / bias
    parts: nn.ModuleList
    module_order: Tensor
    module_scale: Tensor
    module_bias: Tensor

    def __init__(
        self,
        config: FusionModelConfig,
        encoders: Mapping[str, Encoder] | None = None,
        embed_dims: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.modalities: list[str] = config.modalities
        if encoders is None and embed_dims is None:
            encoders = {m: build_encoder(m, s, "model config", source="--model.encoders")
                        for m, s in config.encoders.items()}
        for m, enc in dict(encoders or {}).items():
            check_modality(m, enc, "encoders")
        self.encoders = nn.ModuleDict(dict(encoders or {}))
        if encoders is not None:
            embed_dims = {m: int(e.embed_dim) for m, e in encoders.items()}
        assert embed_dims is not None
        if sorted(embed_dims) != self.modalities:
            raise ConfigError(f"encoders/embed_dims cover {sorted(embed_dims)} but the config names {self.modalities}.")
        self.embed_dims = {m: int(embed_dims[m]) for m in self.modalities}
        if config.modules:
            self._build_parts()
            return
        if config.standardize:
            self.feature_norm = nn.ModuleDict({m: FeatureNorm(self.embed_dims[m]) for m in self.modalities})
        d, c, p = config.hidden_dim, config.num_outputs, config.dropout
        if config.stage in ("early", "hybrid"):
            if config.stage == "early":
                self.proj = nn.ModuleDict({m: nn.Linear(self.embed_dims[m], d) for m in self.modalities})
                self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m in self.modalities})
            else:
                self.proj = nn.ModuleDict({m: _mlp(self.embed_dims[m], d, d, p) for m in self.modalities})
        if config.stage == "late":
            # per-modality decision embedding e_m and its own prediction z_m = W_m e_m
            self.late_encoders = nn.ModuleDict({m: _mlp(self.embed_dims[m], d, d, p) for m in self.modalities})
            self.late_heads = nn.ModuleDict({m: nn.Linear(d, c) for m in self.modalities})
        elif config.stage == "hybrid":
            self.late_heads = nn.ModuleDict({m: _mlp(d, d, c, p) for m in self.modalities})
        if config.stage == "hybrid":
            # mixing weights over [fused, *modalities]; fused starts favoured
            self.mix_logits = nn.Parameter(torch.tensor([1.0] + [0.0] * len(self.modalities)))
        self.fusion_head: FusionHead
        self.trunk: _Trunk
        self.classifier: nn.Linear
        self._build_head(config.fusion_head, dict(config.head_options))

    # composed models and unit masks (zoo.modular, docs/modularity.md) --------------------------------
    def _build_parts(self) -> None:
        """A composed model: one head-only model per ``config.modules`` entry, with its unit masks, and the
        per-output calibration ``module_scale`` / ``module_bias`` [C] that makes the parts' scores comparable."""
        parts = []
        for entry in self.config.modules:
            part = FusionModel(FusionModelConfig.from_dict(entry["config"]), embed_dims=self.embed_dims)
            part.set_unit_masks({k: torch.ones(w) for k, w in part.unit_widths().items()})
            parts.append(part)
        self.parts = nn.ModuleList(parts)
        order = [name for entry in self.config.modules for name in entry["labels"]]  # the parts' columns in turn
        self.register_buffer("module_order", torch.tensor([order.index(x) for x in self.config.labels]))
        self.register_buffer("module_scale", torch.ones(self.config.num_outputs))
        self.register_buffer("module_bias", torch.zeros(self.config.num_outputs))

    def unit_widths(self) -> dict[str, int]:
        """Layer -> width of the head side's unit layers: each modality's input to the fusion head
        (``proj_<modality>``), the fusion head's hidden activations where it has them (``head_hidden``: a GELU /
        ReLU after a Linear, e.g. the concat MLP's), the head's fused output (``head``), the hidden ReLU of each
        trunk layer's MLP (``trunk_hidden``) and the trunk's output (``trunk``). Several hidden layers of one kind
        are numbered (``head_hidden0``, ...)."""
        if self.config.modules:
            raise ConfigError("a composed model's units live in its parts (model.parts[i].unit_widths()).")
        dims = self._head_dims()
        hidden = self._hidden_units
        return {**{f"proj_{m}": dims[m] for m in self.modalities},
                **{k: w for k, w in hidden.items() if k.startswith("head_hidden")}, "head": self.config.hidden_dim,
                **{k: w for k, w in hidden.items() if k.startswith("trunk_hidden")}, "trunk": self.config.hidden_dim}

    def set_unit_masks(self, masks: Mapping[str, Tensor] | None) -> FusionModel:
        """Multiply the head side's unit activations by ``masks`` (layer -> [W], 1 = keep), saved with the
        weights; None removes them. A decomposed class module is its model with the class's masks."""
        if masks is None:
            self.__dict__.pop("unit_masks", None)
            self._modules.pop("unit_masks", None)
            return self
        widths = self.unit_widths()
        holder = nn.Module()
        for layer, width in widths.items():
            mask = masks[layer] if layer in masks else torch.ones(width)
            if tuple(mask.shape) != (width,):
                raise InputError(f"unit mask {layer!r} has shape {tuple(mask.shape)}; this model's is ({width},).")
            holder.register_buffer(layer, mask.detach().clone().float())
        self.unit_masks = holder
        return self

    def _mask(self, layer: str, x: Tensor) -> Tensor:
        """``x`` [..., W] times the unit mask of ``layer`` (unchanged when the model has none)."""
        holder = self._modules.get("unit_masks")
        return x if holder is None else x * getattr(holder, layer).to(x.dtype)

    def _fuse_parts(self, feats: dict[str, ModalityOutput]) -> FusionModelOutput:
        """A composed model: each part's scores for its classes, calibrated, in the order of ``config.labels``."""
        columns, outs = [], []
        for part, entry in zip(self.parts, self.config.modules, strict=True):
            out = cast(FusionModel, part).fuse(feats)
            outs.append(out)
            columns.append(out.logits[:, entry["class_indices"]])  # [B, c_k]
        scores = torch.cat(columns, dim=-1)[:, self.module_order]  # [B, C]
        logits = scores * self.module_scale.to(scores.dtype) + self.module_bias.to(scores.dtype)  # [B, C]
        return FusionModelOutput(logits, outs[0].fused, {}, outs[0].present, {})

    def _weight_dtype(self) -> torch.dtype:
        """The dtype the head side runs in (its classifier's; a composed model: its first part's)."""
        if self.config.modules:
            return cast(FusionModel, self.parts[0])._weight_dtype()
        return self.classifier.weight.dtype

    # ---------------------------------------------------------------------------------------------
    def _head_dims(self) -> dict[str, int]:
        if self.config.stage == "late" and self.config.late_decision == "logits":
            return {m: self.config.num_outputs for m in self.modalities}
        return {m: self.config.hidden_dim for m in self.modalities}

    def _build_head(self, name: str, options: dict[str, Any]) -> None:
        d = self.config.hidden_dim
        try:
            self.fusion_head = create_fusion_head(name, self._head_dims(), d, **options)
        except (ConfigError, RegistryError):
            raise
        except (TypeError, ValueError) as e:  # an option of the wrong type or value, e.g. {"floor": "high"}
            said = " ".join(str(e).split())[:200]  # one line, whatever the library wrote
            raise ConfigError(f"fusion head {name!r} cannot be built with options {options} ({type(e).__name__}: "
                              f"{said}); fix --model.head_options.") from e
        self.trunk = _Trunk(d, self.config.trunk_layers, self.config.dropout)
        self.classifier = nn.Linear(d, self.config.num_outputs)
        self._hidden_units: dict[str, int] = {}  # hidden unit layer -> width (after proj_*, in fuse order)
        heads = _hidden_activations(self.fusion_head)
        trunk = [(cast(nn.Module, layer.activation), 2 * d, False) for layer in self.trunk.layers]
        for prefix, acts in (("head_hidden", heads), ("trunk_hidden", trunk)):
            for i, (act, width, routed) in enumerate(acts):
                name = prefix if len(acts) == 1 else f"{prefix}{i}"
                act.register_forward_hook(_UnitHook(self, name, routed))
                self._hidden_units[name] = width

    def swap_fusion_head(self, name: str, **options: Any) -> FusionModel:
        """Replace the fusion head (and the trunk and classifier after it), keeping encoders and projections.

        Returns ``self``; ``self.config`` records the new head.
        """
        if self.config.modules:
            raise ConfigError("a composed model has no head of its own to swap; compose other modules instead.")
        self._build_head(name, options)
        self.config = self.config.replace(fusion_head=name, head_options=dict(options))
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the fusion head, trunk and classifier (what a head swap retrains); a composed model:
        every parameter of its parts."""
        if self.config.modules:
            return list(self.parts.parameters())
        return [*self.fusion_head.parameters(), *self.trunk.parameters(), *self.classifier.parameters()]

    def fit_feature_norm(self, feats: Mapping[str, ModalityOutput], refit: bool = False) -> list[str]:
        """Set each modality's standardisation from its pooled training features (``standardize``); modalities
        already fitted (a loaded or resumed model) keep theirs unless ``refit``. Returns the modalities set."""
        norms = getattr(self, "feature_norm", None)
        done = []
        for m, f in sorted(feats.items()):
            if norms is not None and m in norms and (refit or not bool(norms[m].fitted)):
                select = getattr(f, "select", None)
                if callable(select):  # a feature store: read row chunks through it, never the whole split
                    rows, step = f.batch_size, 16384
                    norms[m].fit_chunks(lambda sel=select, n=rows, k=step: (
                        (c.pooled, c.present) for c in (sel(torch.arange(s, min(n, s + k)), tokens=False)
                                                    for s in range(0, n, k))))
                else:
                    norms[m].fit(f.pooled, f.present)
                done.append(m)
        return done

    # ---------------------------------------------------------------------------------------------
    def preprocess(self, **raw: Any) -> dict[str, dict[str, Tensor]]:
        """Raw inputs by modality (lists of strings, images, waveforms or paths; None = missing) -> a batch."""
        unknown = set(raw) - set(self.modalities)
        if unknown:
            raise InputError(f"this model takes {self.modalities}, not {sorted(unknown)}; drop those inputs.")
        sizes = {m: len(v) for m, v in raw.items() if v is not None}
        if len(set(sizes.values())) > 1:
            raise InputError(f"inputs have different numbers of samples {sizes}; give each the same count.")
        return {m: self._encoder(m).preprocessor(v) for m, v in raw.items() if v is not None}

    def encode(self, batch: Mapping[str, Mapping[str, Tensor] | ModalityOutput]) -> dict[str, ModalityOutput]:
        """Run each modality's encoder; values that are already ``ModalityOutput`` (cached features) pass through."""
        if not isinstance(batch, Mapping):
            raise InputError(f"batch is a {type(batch).__name__}; pass {{modality: inputs}} "
                             "(e.g. model.preprocess(...)).")
        out: dict[str, ModalityOutput] = {}
        for m in sorted(batch):
            if m not in self.modalities:
                raise InputError(f"batch has modality {m!r}, but this model takes {self.modalities}.")
            value = batch[m]
            if isinstance(value, ModalityOutput):
                out[m] = value
            else:
                if m not in self.encoders:
                    raise InputError(f"{m!r} came as raw inputs but this head-only model needs cached features.")
                out[m] = self._run_encoder(m, value)
        return out

    def _encoder(self, m: str) -> Encoder:
        """The encoder of modality ``m`` (``ModuleDict`` items are typed ``Module``)."""
        return cast(Encoder, self.encoders[m])

    def _run_encoder(self, m: str, value: Any) -> ModalityOutput:
        """Encode one modality; a malformed tensor batch becomes an InputError naming its keys and shapes."""
        if not isinstance(value, Mapping):
            raise InputError(f"{m!r} inputs are a {type(value).__name__}; pass the dict of tensors that "
                             f"model.preprocess({m}=[...]) returns, or a ModalityOutput of cached features.")
        try:
            return self.encoders[m](dict(value))
        except torch.OutOfMemoryError:
            raise
        except (KeyError, TypeError, IndexError, RuntimeError) as e:
            shapes = {k: (tuple(v.shape), str(v.dtype)) if isinstance(v, Tensor) else type(v).__name__
                      for k, v in value.items()}
            raise InputError(f"{m!r} encoder {type(self.encoders[m]).__name__} cannot run on inputs {shapes} "
                             f"({type(e).__name__}: {e}); build them with model.preprocess({m}=[...]).") from e

    def _check_features(self, m: str, f: Any) -> ModalityOutput:
        """Validate one modality's features against this model: known key, ModalityOutput, width, dtype."""
        if m not in self.modalities:
            raise InputError(f"features for modality {m!r}, but this model takes {self.modalities}; drop them.")
        if not isinstance(f, ModalityOutput):
            raise InputError(f"{m!r} features are a {type(f).__name__}; pass ModalityOutput(tokens, mask, pooled).")
        f.validate(m)
        if f.dim != self.embed_dims[m]:
            raise InputError(f"{m!r} features have width {f.dim} but this model's {m} encoder gives "
                             f"{self.embed_dims[m]}; cache features with the encoder in config.encoders[{m!r}].")
        want = self._weight_dtype()
        if not f.pooled.is_floating_point() or (
                f.pooled.dtype != want and not torch.is_autocast_enabled(f.pooled.device.type)):
            raise InputError(f"{m!r} features are {f.pooled.dtype} but the model runs in {want}; "
                             f"convert them with .to({want}).")
        return f

    def _modality_dropout(self, feats: dict[str, ModalityOutput]) -> dict[str, ModalityOutput]:
        probs = self.config.modality_dropout_map
        if not self.training or not probs or len(feats) < 2:
            return feats
        ref = next(iter(feats.values()))
        keep = {m: torch.rand(ref.batch_size, device=ref.pooled.device) >= probs.get(m, 0.0) for m in feats}
        present = {m: f.present & keep[m] for m, f in feats.items()}
        none_left = ~torch.stack(list(present.values())).any(0)  # [B]
        out = {}
        for m, f in feats.items():
            k = keep[m] | (none_left & f.present)  # never drop a sample's last modality
            out[m] = ModalityOutput(f.tokens, f.mask & k[:, None], f.pooled * k[:, None].to(f.pooled.dtype))
        return out

    def fuse(self, feats: Mapping[str, ModalityOutput]) -> FusionModelOutput:
        """Fuse encoder outputs (any non-empty subset of modalities) into predictions."""
        if not feats:
            raise InputError(f"every modality is missing: give at least one of {self.modalities}.")
        feats = {m: self._check_features(m, feats[m]) for m in sorted(feats)}
        if self.config.modules:
            return self._fuse_parts(feats)
        norms = getattr(self, "feature_norm", None)
        if norms is not None:
            feats = {m: norms[m](f) for m, f in feats.items()}
        feats = self._modality_dropout(feats)
        present = {m: f.present for m, f in feats.items()}
        stage = self.config.stage
        modality_logits: dict[str, Tensor] = {}
        head_in: dict[str, ModalityOutput] = {}
        units: dict[str, Tensor] = {}  # layer -> [B, W]; "<layer>.tokens" -> [B, T, W] where tokens are separate
        if stage == "late":
            for m, f in feats.items():
                e = self.late_encoders[m](f.pooled)  # [B, D] decision embedding
                modality_logits[m] = self.late_heads[m](e)  # [B, C]
                z = modality_logits[m] if self.config.late_decision == "logits" else e
                z = units[f"proj_{m}"] = self._mask(f"proj_{m}", z)  # [B, W]
                head_in[m] = ModalityOutput(z[:, None], present[m][:, None], z)
        else:
            for m, f in feats.items():
                pooled = self.proj[m](f.pooled)  # [B, D]
                if stage == "early":
                    pooled = pooled + self.modality_embed[m]
                pooled = units[f"proj_{m}"] = self._mask(f"proj_{m}", pooled)
                if self.config.fuse_tokens:
                    tokens = self.proj[m](f.tokens)  # [B, T, D]
                    if stage == "early":
                        tokens = tokens + self.modality_embed[m]
                    tokens = units[f"proj_{m}.tokens"] = self._mask(f"proj_{m}", tokens)
                    head_in[m] = ModalityOutput(tokens, f.mask, pooled)
                else:  # one token per modality: its pooled vector
                    head_in[m] = ModalityOutput(pooled[:, None], f.present[:, None], pooled)
                if stage == "hybrid":
                    modality_logits[m] = self.late_heads[m](pooled)  # [B, C]
        self.__dict__["_unit_sink"] = units  # the hidden unit layers' hooks record into it
        self.__dict__["_unit_rows"] = next(iter(feats.values())).pooled.shape[0]
        try:
            out = self.fusion_head(head_in)
            units["head"] = self._mask("head", out.fused)  # [B, D]
            fused = units["trunk"] = self._mask("trunk", self.trunk(units["head"], out.tokens, out.token_mask))
        finally:
            self.__dict__.pop("_unit_sink", None)
            self.__dict__.pop("_unit_rows", None)
        logits = self.classifier(fused)  # [B, C]
        if stage == "hybrid":
            logits = self._mix(logits, modality_logits, present)
        return FusionModelOutput(logits, fused, modality_logits, present, dict(out.aux), units)

    def _mix(self, fused_logits: Tensor, modality_logits: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        """Hybrid: softmax-weighted mean of the fused and the present modalities' predictions."""
        w = self.mix_weights(present, fused_logits.shape[0], fused_logits.device)  # [B, 1+M]
        stacked = [fused_logits] + [modality_logits.get(m, torch.zeros_like(fused_logits)) for m in self.modalities]
        return (torch.stack(stacked, dim=1) * w[..., None]).sum(1)  # [B, C]

    def mix_weights(self, present: Mapping[str, Tensor], b: int, device: torch.device) -> Tensor:
        """Hybrid: [B, 1+M] softmax weights of ``[fused, *modalities]`` (absent modalities get 0)."""
        avail = torch.ones(b, 1 + len(self.modalities), dtype=torch.bool, device=device)
        for i, m in enumerate(self.modalities, start=1):
            avail[:, i] = present[m] if m in present else False
        return self.mix_logits.expand(b, -1).masked_fill(~avail, float("-inf")).softmax(-1)  # [B, 1+M]

    def forward(self, batch: Mapping[str, Mapping[str, Tensor] | ModalityOutput]) -> FusionModelOutput:
        """Encode then fuse. ``batch`` maps modality -> preprocessed inputs or cached ``ModalityOutput``."""
        return self.fuse(self.encode(batch))

    # ---------------------------------------------------------------------------------------------
    def inference_runner(self, fold: bool = True) -> tuple[FusionModel, dict[str, str]]:
        """This model with frozen image encoders BatchNorm-folded and channels-last (``zoo.optimize``), cached.

        The copy is rebuilt when any encoder parameter or buffer changes (version counter, storage, device, dtype)
        and when a head-side module or the config is replaced (``swap_fusion_head``); ``fold=False`` returns
        ``self``. Returns ``(model, {modality: tag})``.
        """
        if not fold:
            return self, dict.fromkeys(self.encoders, "plain")
        weights = tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype)  # .to() / load_state_dict change these
                        for t in [*self.encoders.parameters(), *self.encoders.buffers()])
        # the copy shares every other module: a replaced one (swap_fusion_head) or a new config makes it stale
        shared = (tuple((k, id(v)) for k, v in self._modules.items() if k != "encoders"), id(self.config))
        state = (weights, shared)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != state:
            with torch.inference_mode(False), torch.no_grad():
                runner, tags = inference_model(self)
            cached = (state, runner, tags)
            object.__setattr__(self, "_inference_cache", cached)  # not a submodule: stays out of state_dict
        return cast(FusionModel, cached[1]), cached[2]  # inference_model copies this model's class

    @torch.no_grad()
    def explain_features(self, feats: Mapping[str, ModalityOutput],
                         out: FusionModelOutput | None = None) -> list[dict[str, Any]]:
        """Per-sample explanations of ``fuse(feats)`` (see ``zoo.predict.explain`` for the keys).

        Each given modality's contribution is the leave-one-modality-out change of the prediction: the same
        samples fused again with that modality marked absent (all-False mask), which makes the head use its
        learned missing embedding (late stage: also drops that modality's decision; hybrid: its share of the mix).
        """
        was_training = self.training
        self.eval()
        try:
            out = self.fuse(feats) if out is None else out
            given = [m for m in self.modalities if m in feats]
            contribution = {
                m: _predict.contributions(self.config.task, out.logits,
                                          self.fuse({**feats, m: _predict.drop_modality(feats[m])}).logits)
                for m in given
            }
        finally:
            self.train(was_training)
        b = out.logits.shape[0]
        hybrid = self.config.stage == "hybrid" and not self.config.modules
        mix = self.mix_weights(out.present, b, out.logits.device) if hybrid else None
        present = {m: feats[m].present for m in given}
        return [_predict.explain(out.aux, self.modalities, i, b, contribution, mix, present) for i in range(b)]

    @torch.no_grad()
    def predict(self, text: Any = None, image: Any = None, audio: Any = None, *,
                batch_size: int = 32, explain: bool = True, fold: bool = True,
                **unknown: Any) -> list[dict[str, Any]]:
        """Predict from raw inputs of any subset of the model's modalities (at least one).

        Args:
            text: a string or a list of strings (None items = missing).
            image: a path, PIL image or [H, W, C] array, or a list of them.
            audio: a path, a [N] waveform or a ``(waveform, sample_rate)`` tuple, or a list of them.
            batch_size: samples per forward pass.
            explain: add ``explain`` to each result (per-modality contributions and the head's weights).
            fold: run frozen image encoders BatchNorm-folded and channels-last (same outputs within 1e-4);
                False runs the model exactly as loaded.

        Returns:
            One dict per sample: ``label`` + ``probs`` (multiclass), ``labels`` + ``probs`` (multilabel) or
            ``values`` (regression), plus ``explain``: ``contribution`` and ``share`` per modality (leave-one-
            modality-out, see :meth:`explain_features`) and the head's gates / weights / routing / hybrid mix.
        """
        if unknown:
            raise InputError(f"predict() takes text=, image=, audio= (and batch_size=), not {sorted(unknown)}; "
                             f"this model's modalities are {self.modalities}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer, e.g. batch_size=32.")
        raw = {m: _predict.as_items(m, v) for m, v in (("audio", audio), ("image", image), ("text", text))
               if v is not None}
        n = _predict.check_samples(raw, self.modalities)
        self.eval()
        runner = self.inference_runner(fold)[0]
        device = next(self.parameters()).device
        results: list[dict[str, Any]] = []
        for start in range(0, n, batch_size):
            chunk = {m: v[start:start + batch_size] for m, v in raw.items() if v is not None}
            batch = self.preprocess(**chunk)
            batch = {m: {k: t.to(device) if isinstance(t, Tensor) else t for k, t in b.items()}
                     for m, b in batch.items()}
            with torch.inference_mode():
                feats = runner.encode(batch)
                out = runner.fuse(feats)
            bad = ~torch.isfinite(out.logits).all(dim=-1)  # [B]
            if bad.any():
                i = start + int(bad.nonzero()[0])
                given = {m: _predict.describe(v[i - start]) for m, v in chunk.items()}
                raise InputError(f"the model produced NaN/inf for sample {i} (inputs {given}); check that input "
                                 "(empty audio, blank text?) and the model weights.")
            rows = _predict.decode(self.config, out.logits)
            if explain:
                with torch.inference_mode():
                    explanations = self.explain_features(feats, out)
                for row, e in zip(rows, explanations, strict=True):
                    row["explain"] = e
            results.extend(rows)
        return results

    def save_pretrained(self, path: str | Path, **card: Any) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``path`` atomically."""
        return save_pretrained(self, path, **card)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> FusionModel:
        """Load from a local folder, a zoo name (``zoo.list_pretrained()``) or a Hub repo ``owner/name`` (eval mode).

        A Hub repo is read through the Hugging Face cache: downloaded when online, found in the cache offline.

        Keyword arguments: ``map_location``, ``strict``, ``check_hashes`` (see ``zoo.checkpoint.load_checkpoint``).
        """
        return load_checkpoint(cls, name_or_path, **kwargs)
