"""Typed, serialisable configs of the fused model (``config.json`` of every checkpoint)."""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from encoders import (
    FINETUNE_POLICIES,
    MAX_LAYERS,
    MAX_WIDTH,
    MODALITIES,
    check_encoder_options,
    check_options,
    default_finetune,
    encoder_modality,
)
from fusion_errors import ConfigError

__all__ = ["EncoderSpec", "FusionModelConfig", "FORMAT_VERSION", "MODULARITY_KEYS", "MODULE_KEYS", "STAGES", "TASKS",
           "MAX_HIDDEN_DIM", "MAX_LABEL_CHARS", "MAX_LABELS", "MAX_TRUNK_LAYERS", "check_known_keys",
           "dataclass_from_dict", "field_defaults"]

# 2: defaults = the default recipe (early, pooled vectors, dropout 0.2, modality dropout 0.1). A version-1 dict
# was written with the version-1 defaults below, which a missing key keeps (to_dict always writes every field).
# 3: pooled features standardised with training statistics (``standardize``), hidden_dim 256, and the concat head's
# MLP (hidden 2 x out_dim) by default. Older dicts keep the defaults they were written with for the keys they
# leave out (to_dict always writes every field, so only keys added later can be missing).
FORMAT_VERSION = 3
_V1_DEFAULTS: dict[str, Any] = {"stage": "late", "dropout": 0.1, "fuse_tokens": True, "modality_dropout": 0.0}
_V2_DEFAULTS: dict[str, Any] = {"standardize": False}
STAGES = ("early", "late", "hybrid")
TASKS = ("multiclass", "multilabel", "regression")
#: the modular training objectives (docs/modularity.md): their weights in ``modularity``
MODULARITY_KEYS = ("affinity", "compactness", "dispersion")
#: the keys of one ``modules`` entry of a composed model (``zoo.modular``)
MODULE_KEYS = ("class_indices", "config", "labels", "source")
# Sizes a config can set, bounded before anything is built (a config.json is untrusted input; docs/errors.md).
# Encoder and head options are bounded by name in encoders._options.OPTION_BOUNDS.
MAX_HIDDEN_DIM = MAX_WIDTH
MAX_TRUNK_LAYERS = MAX_LAYERS
MAX_LABELS = 1_000_000  # classes or regression targets (a 1M x 256 classifier: ~1 GB of float32)
MAX_LABEL_CHARS = 1000


def _check_type(where: str, value: Any, hint: Any) -> None:
    """Raise ConfigError naming ``where`` when ``value`` does not match the type ``hint`` (shallow)."""
    origin = get_origin(hint)
    if hint is Any:
        return
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}={value!r} is not one of {get_args(hint)}.")
        return
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(hint):
            try:
                _check_type(where, value, arg)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} has the wrong type; expected {hint}.")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null.")
        return
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if base in (tuple, list) and isinstance(value, (list, tuple)):
        return
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        if not isinstance(value, (base, dict)):
            raise ConfigError(f"{where} must be a mapping of {base.__name__} fields, got {type(value).__name__}.")
        return
    if isinstance(base, type) and (not isinstance(value, base) or (base is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {base.__name__}, got {type(value).__name__} {value!r}.")


def check_known_keys(keys: Any, known: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key not in ``known``, naming the closest known key (difflib).

    ``prefix`` is how a user writes the key (``--model.`` on a command line), so the message names the flag.
    """
    known = sorted(known)
    for key in sorted(str(k) for k in keys):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"unknown key {prefix}{key} in {where}; {hint}known keys: {', '.join(known)}.")


def field_defaults(cls: type) -> dict[str, Any]:
    """Field name -> default of a dataclass (factories called); fields without a default are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys (with the close match), missing required keys and
    wrong types raise ConfigError naming ``where.key``; the class's ``__post_init__`` checks the values."""
    return _from_dict(cls, data, where)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    check_known_keys(data, names, where)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key(s) {missing} in {where}.")
    for key, value in data.items():
        _check_type(f"{where}.{key}", value, hints[key])
    return cls(**data)


@dataclass(frozen=True)
class EncoderSpec:
    """One modality's encoder: a registered name, its options and its fine-tuning policy.

    ``finetune`` left out (None) takes the encoder's default (``encoders.default_finetune``): ``frozen`` for
    pretrained encoders, ``full`` for ones trained from scratch (``mel-cnn``); the resolved value is stored.
    """

    name: str
    finetune: Literal["frozen", "full", "last_n", "lora"] | None = None
    last_n: int = 1
    lora_r: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finetune is None:
            object.__setattr__(self, "finetune", default_finetune(self.name))
        if self.finetune not in FINETUNE_POLICIES:
            raise ConfigError(f"finetune={self.finetune!r} is not one of {FINETUNE_POLICIES}.")
        if isinstance(self.options, dict):
            check_encoder_options(self.name, self.options)
        if isinstance(self.last_n, int) and self.last_n < 1 or isinstance(self.lora_r, int) and self.lora_r < 1:
            raise ConfigError(f"last_n={self.last_n} and lora_r={self.lora_r} must be >= 1.")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | EncoderSpec, where: str = "encoder") -> EncoderSpec:
        """Accept a bare name (``"minilm-l6"``), a mapping of fields, or an EncoderSpec."""
        if isinstance(value, str):
            return cls(name=value)
        return _from_dict(cls, value, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FusionModelConfig:
    """Everything needed to rebuild a :class:`zoo.model.FusionModel`.

    Attributes:
        encoders: modality ("text" | "image" | "audio") -> encoder spec.
        fusion_head: a registered fusion head name (``fusion_heads.list_fusion_heads()``).
        head_options: the head's own keyword options.
        stage: ``early`` | ``late`` | ``hybrid`` (docs/stages.md).
        task: ``multiclass`` | ``multilabel`` | ``regression``.
        labels: class names (classification) or target names (regression).
        hidden_dim: shared width D of projections, the fused vector and the trunk.
        trunk_layers: layers of the shared trunk after the head.
        dropout: dropout in projections, trunk and task heads.
        modality_dropout: modality -> probability of hiding it for a training sample, or one probability for
            every modality (``modality_dropout_map`` resolves either).
        late_loss_weight: weight of the per-modality losses in late and hybrid stages.
        late_decision: what the head fuses in the late stage: each modality's decision ``embedding``
            (width D) or its ``logits`` (width C, classic stacking).
        fuse_tokens: early and hybrid stages: the head fuses every modality's tokens (True) or one pooled vector
            per modality (False: feature-level fusion of pooled vectors, cheap on CPU; the feature cache then
            stores pooled vectors only).
        standardize: centre each modality's features on the mean of its pooled training features and scale them
            by their root mean square (``zoo.model.FeatureNorm``: buffers set when a fit starts, saved with the
            weights and applied wherever the model runs: predict, serve, export). Encoders' pooled vectors differ
            in scale by orders of magnitude between modalities; brought to one scale, one learning rate suits all.
        modularity: weights of the modular training objectives on the head side's unit activations
            (``{"affinity": a, "dispersion": d, "compactness": c}``, keys left out weigh 0; None = plain training;
            multiclass only; docs/modularity.md).
        modules: a composed model's parts (``zoo.modular.compose``): each entry gives a source model's config,
            which of its classes it scores (``class_indices``, named ``labels``) and where it came from
            (``source``); its weights and unit masks are in model.safetensors. Empty = an ordinary model.

    The defaults are the default recipe (``fusion-zoo fit`` with no flags): the one place each default is set;
    ``recipes.task.FusionTask`` takes its flags' defaults from here.
    """

    encoders: dict[str, EncoderSpec]
    labels: tuple[str, ...]
    fusion_head: str = "concat"
    head_options: dict[str, Any] = field(default_factory=dict)
    stage: Literal["early", "late", "hybrid"] = "early"
    task: Literal["multiclass", "multilabel", "regression"] = "multiclass"
    hidden_dim: int = 256  # with the concat MLP (2 x wide): learns cross-modal interactions from a few thousand rows
    trunk_layers: int = 1
    dropout: float = 0.2
    modality_dropout: dict[str, float] | float = 0.1
    late_loss_weight: float = 0.5
    late_decision: Literal["embedding", "logits"] = "embedding"
    fuse_tokens: bool = False
    standardize: bool = True
    modularity: dict[str, float] | None = None
    modules: tuple[dict[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._check_sizes()
        encs = {}
        for m, spec in dict(self.encoders).items():
            if m not in MODALITIES:
                raise ConfigError(f"encoders key {m!r} is not a modality; use one of {MODALITIES}.")
            encs[m] = EncoderSpec.parse(spec, f"encoders.{m}")
            kind = encoder_modality(encs[m].name)  # from the registry, before anything is built
            if kind is not None and kind != m:
                raise ConfigError(f"encoders.{m} is {encs[m].name!r}, which encodes {kind}, not {m}; give each "
                                  "modality an encoder of its own kind (encoders.list_encoders()).")
        if not encs:
            raise ConfigError("encoders is empty: give at least one, e.g. {'text': 'minilm-l6'}.")
        object.__setattr__(self, "encoders", {m: encs[m] for m in sorted(encs)})
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r} is not one of {STAGES}.")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {TASKS}.")
        md = self.modality_dropout
        if isinstance(md, (int, float)) and not isinstance(md, bool):  # one probability for every modality
            if not 0.0 <= md < 1.0:
                raise ConfigError(f"modality_dropout={md} must be in [0, 1).")
            object.__setattr__(self, "modality_dropout", float(md))  # kept as one number: replace() keeps it valid
        elif not isinstance(md, dict):
            raise ConfigError(f"modality_dropout={md!r} must be a number in [0, 1) or a mapping modality -> number.")
        if not self.labels:
            raise ConfigError("labels is empty: give the class names (or target names for regression).")
        if self.task != "regression" and len(self.labels) < 2:
            raise ConfigError(f"a {self.task} task needs at least 2 labels, got {list(self.labels)}.")
        for m, p in self.modality_dropout_map.items():
            if m not in self.encoders:
                raise ConfigError(f"modality_dropout names {m!r}, which has no encoder; use {list(self.encoders)}.")
            if not 0.0 <= float(p) < 1.0:
                raise ConfigError(f"modality_dropout[{m!r}]={p} must be in [0, 1).")
        if self.late_decision not in ("embedding", "logits"):
            raise ConfigError(f"late_decision={self.late_decision!r} is not 'embedding' or 'logits'.")
        twice = sorted(x for x, k in collections.Counter(self.labels).items() if k > 1)  # linear: 300k labels are fine
        if twice:
            shown = ", ".join(map(repr, twice[:10])) + (f" and {len(twice) - 10} more" if len(twice) > 10 else "")
            raise ConfigError(f"labels {shown} appear more than once among the {len(self.labels)} labels; each label "
                              "once.")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1).")
        if not (isinstance(self.late_loss_weight, (int, float)) and math.isfinite(self.late_loss_weight)
                and self.late_loss_weight >= 0):
            raise ConfigError(f"late_loss_weight={self.late_loss_weight} must be a finite number >= 0.")
        if self.fusion_head == "concat" and isinstance(self.head_options, dict) and \
                "hidden_dim" not in self.head_options:  # recorded, so that the saved config says the head's width
            object.__setattr__(self, "head_options", {**self.head_options, "hidden_dim": 2 * self.hidden_dim})
        if isinstance(self.head_options, dict):
            from fusion_heads import _REGISTRY as heads  # the head's own keyword options, checked before a build

            if self.fusion_head in heads:
                check_options("fusion head", self.fusion_head, heads.get(self.fusion_head), self.head_options,
                              reserved=("modality_dims", "out_dim"))
        self._check_modularity()
        self._check_modules()
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version} is newer than this fusion-zoo understands "
                f"({FORMAT_VERSION}); upgrade fusion-zoo: pip install -U fusion-zoo."
            )

    def _check_sizes(self) -> None:
        """Counts and widths within their limits, labels scalar: checked first, in time linear in the config."""
        labels = self.labels
        if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
            raise ConfigError(f"labels must be a list of class names, got {type(labels).__name__}.")
        if len(labels) > MAX_LABELS:
            raise ConfigError(f"labels has {len(labels):,} entries, above the limit of {MAX_LABELS:,}; this is not a "
                              "classification a fused model can learn (group rare classes, or use regression).")
        for i, x in enumerate(labels):
            if isinstance(x, bool) or not isinstance(x, (str, int, float)):
                raise ConfigError(f"labels[{i}]={x!r} must be a string (a class name), not {type(x).__name__}.")
            if isinstance(x, str) and len(x) > MAX_LABEL_CHARS:
                raise ConfigError(f"labels[{i}] is {len(x):,} characters long, above the limit of {MAX_LABEL_CHARS}.")
        for key, limit, low in (("hidden_dim", MAX_HIDDEN_DIM, 1), ("trunk_layers", MAX_TRUNK_LAYERS, 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}={value!r} must be an int.")
            if not low <= value <= limit:
                raise ConfigError(f"{key}={value} must be in {low}..{limit}.")
        if isinstance(self.modules, (list, tuple)) and len(self.modules) > MAX_LABELS:
            raise ConfigError(f"modules has {len(self.modules):,} entries, above the limit of {MAX_LABELS:,}.")

    def _check_modularity(self) -> None:
        """``modularity``: known keys, finite weights >= 0, a multiclass task (the objectives compare classes)."""
        weights = self.modularity
        if weights is None:
            return
        if not isinstance(weights, dict):
            raise ConfigError(f"modularity={weights!r} must be a mapping like "
                              '{"affinity": 1.0, "dispersion": 1.0, "compactness": 0.1}, or null.')
        check_known_keys(weights, MODULARITY_KEYS, "modularity", prefix="modularity.")
        for key, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"modularity.{key}={value!r} must be a finite number >= 0.")
        if self.task != "multiclass":
            raise ConfigError(f"modularity needs a multiclass task (its objectives compare classes), not "
                              f"{self.task!r}; drop --model.modularity.")
        object.__setattr__(self, "modularity", {k: float(weights[k]) for k in sorted(weights)})

    def _check_modules(self) -> None:
        """``modules``: each entry has the known keys, one class per label, and names this config's labels in
        order; a part's own config is validated (and may not be composed itself)."""
        entries = self.modules
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"modules must be a list of module entries, got {type(entries).__name__}.")
        named: list[str] = []
        checked = []
        for i, entry in enumerate(entries):
            where = f"modules[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where} must be a mapping with keys {list(MODULE_KEYS)}.")
            check_known_keys(entry, MODULE_KEYS, where)
            missing = sorted(set(MODULE_KEYS) - set(entry))
            if missing:
                raise ConfigError(f"missing key(s) {missing} in {where}.")
            part = entry["config"] if isinstance(entry["config"], FusionModelConfig) else \
                FusionModelConfig.from_dict(entry["config"])
            if part.modules:
                raise ConfigError(f"{where}.config is itself composed; compose the modules it was built from.")
            labels, idx = [str(x) for x in entry["labels"]], [int(x) for x in entry["class_indices"]]
            if len(labels) != len(idx) or any(not 0 <= j < part.num_outputs or part.labels[j] != name
                                              for name, j in zip(labels, idx, strict=False)):
                raise ConfigError(f"{where}: labels {labels} are not the classes {idx} of its model's labels "
                                  f"{list(part.labels)}.")
            named += labels
            checked.append({"class_indices": idx, "config": part.to_dict(), "labels": labels,
                            "source": str(entry["source"])})
        if checked and sorted(named) != sorted(self.labels):
            raise ConfigError(f"modules score the labels {named}, but the config's labels are {list(self.labels)}; "
                              "each label must come from exactly one module.")
        object.__setattr__(self, "modules", tuple(checked))

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def modality_dropout_map(self) -> dict[str, float]:
        """``modality_dropout`` as modality -> probability (one number: that probability for every modality)."""
        md = self.modality_dropout
        return dict(md) if isinstance(md, dict) else {m: float(md) for m in self.encoders if md}

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def needs_tokens(self) -> bool:
        """Whether the model reads encoder tokens (False: pooled vectors are enough, e.g. for the cache)."""
        return self.stage != "late" and self.fuse_tokens

    def replace(self, **changes: Any) -> FusionModelConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["modules"] = [dict(m) for m in self.modules]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionModelConfig:
        """Validate ``data`` against the schema (unknown keys name the closest known key, wrong types name the key)
        and build. A dict of an older ``format_version`` keeps that version's defaults for the keys it leaves out;
        the result is a current-version config (every value explicit)."""
        data = dict(data)
        version = data.get("format_version", FORMAT_VERSION)
        old = isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION
        if old and version < 2:
            data = {**_V1_DEFAULTS, **data}
        if old:
            data = {**_V2_DEFAULTS, **data, "format_version": FORMAT_VERSION}
            options = data.get("head_options")
            concat = data.get("fusion_head", "concat") == "concat"
            if concat and isinstance(options, dict) and "hidden_dim" not in options:
                data["head_options"] = {**options, "hidden_dim": 0}  # concat was a single linear map before 3
        if "encoders" in data and isinstance(data["encoders"], dict):
            data["encoders"] = {m: EncoderSpec.parse(v, f"config.encoders.{m}") for m, v in data["encoders"].items()}
        return _from_dict(cls, data, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FusionModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e}); re-save it with model.save_pretrained().") from e
        return cls.from_dict(data)
