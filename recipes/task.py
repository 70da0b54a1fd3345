"""``FusionTask``: the LightningModule that trains and evaluates a :class:`~zoo.model.FusionModel`.

Every ``__init__`` argument is a plain typed value, so ``LightningCLI`` exposes it as a flag
(``--model.fusion_head gating --model.stage early``) and the saved ``.ckpt`` is self-describing:
``hyper_parameters["config"]`` is the resolved :class:`FusionModelConfig` and loads with
``torch.load(path, weights_only=True)``. The flags are the fields of two typed configs, which own every default
and every check: :class:`zoo.config.FusionModelConfig` (the model) and :class:`recipes.settings.OptimConfig`
(training); ``__init__`` builds both at once (tests/recipes/test_module.py checks that the signature matches them).
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any, Literal, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from fusion_errors import CheckpointError, ConfigError, FusionZooError
from zoo._format import is_lora_key
from zoo.config import FusionModelConfig, field_defaults
from zoo.convert import ENCODERS_KEY, fill_state_dict, lean_state_dict
from zoo.model import FusionModel, FusionModelOutput
from zoo.modular import modularity_losses

from .metrics import SplitMetrics
from .settings import OptimConfig

__all__ = ["FusionTask", "DEFAULT_ENCODERS", "class_weight_tensor", "task_loss"]

# The offline default per modality. image: EfficientNet-Lite0 at 64 px beside a 16-px colour thumbnail (small,
# degraded images: docs/encoders.md); audio: Whisper base's encoder (speech content; resemblyzer-lstm encodes the
# speaker instead). Used for the modalities the data has when no encoders are named (docs/recipes.md).
DEFAULT_ENCODERS: dict[str, Any] = {"audio": "whisper-base", "image": "efficientnet-lite0-pixels", "text": "minilm-l6"}
SPLITS = {"val": "validation", "test": "test"}
_M = field_defaults(FusionModelConfig)  # the one default of every model setting (zoo/config.py)
_O = field_defaults(OptimConfig)  # ... and of every training setting (recipes/settings.py)
#: model settings whose flag default is None: "the loaded model's" under init_from, else the config's default
#: (encoders: the data's modalities' DEFAULT_ENCODERS; labels: linked from the data)
INHERITED = ("encoders", "labels", "fusion_head", "head_options")


def _lower_lr(lr: float) -> float:
    """The learning rate a diverging fit should try: a tenth of ``lr``, or the default when ``lr`` is above it (a
    tenth of 1e30 is no advice)."""
    return lr / 10 if lr <= _O["lr"] else _O["lr"]


def warmup_cosine(step: int, total: float, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def task_loss(task: str, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """The training loss of ``task`` for logits [B, C]: cross-entropy (class ``weight`` [C]), binary cross-entropy
    per label (``pos_weight`` [C]) or mean squared error."""
    if task == "multiclass":
        return F.cross_entropy(logits, labels.long(), weight=weight)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
    return F.mse_loss(logits, labels.float().reshape(logits.shape))


def _eval_frozen(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen into eval mode (recursively, largest first)."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _eval_frozen(child)


def class_weight_tensor(spec: str | list[float] | dict[str, float] | None, labels: list[str], task: str,
                        train_labels: Tensor | None = None) -> Tensor | None:
    """The loss weights [C] that ``class_weights`` ``spec`` means for ``labels``, or None for an unweighted loss.

    ``"balanced"``: multiclass N / (C * n_c) over the training labels ``train_labels`` [N] (a class absent from
    them weighs 1); multilabel, the ``pos_weight`` of each label, negatives / positives (1 when it has none).
    """
    if spec is None:
        return None
    if task == "regression":
        raise ConfigError("class_weights applies to multiclass and multilabel tasks, not regression; drop it.")
    c = len(labels)
    if spec == "balanced":
        if train_labels is None or train_labels.shape[0] == 0:
            raise ConfigError("class_weights='balanced' needs the training labels; none were given.")
        if task == "multiclass":
            counts = torch.bincount(train_labels.long().reshape(-1), minlength=c).double()  # [C]
            weight = torch.where(counts > 0, counts.sum() / (c * counts.clamp_min(1)), torch.ones_like(counts))
        else:
            pos = train_labels.double().sum(0)  # [C]
            neg = train_labels.shape[0] - pos
            weight = torch.where(pos > 0, neg.clamp_min(1) / pos.clamp_min(1), torch.ones_like(pos))
        return weight.float()
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(labels))
        if unknown:
            raise ConfigError(f"class_weights names {unknown}, which are not labels of this task {labels}; "
                              "fix the names.")
        return torch.tensor([float(spec.get(name, 1.0)) for name in labels])
    if len(spec) != c:
        raise ConfigError(f"class_weights has {len(spec)} weights for {c} labels {labels}; give one per label, "
                          "or a dict label -> weight.")
    return torch.tensor([float(v) for v in spec])


class FusionTask(pl.LightningModule):
    """Train a fused text/image/audio model on one task.

    The model-shape arguments are :class:`FusionModelConfig`'s fields and take their defaults from it; ``lr`` ...
    ``warmup_ratio`` are :class:`OptimConfig`'s. Both are built (and validated) here: ``self.cfg``, ``self.optim``.

    Args:
        encoders: modality -> encoder name or spec (``{"name": ..., "finetune": "frozen"|"full"|"last_n"|"lora"}``);
            None = the default encoder (``DEFAULT_ENCODERS``) of each modality in ``modalities``.
        labels: class names (or regression target names); linked from ``data.labels`` by the CLI.
        modalities: the modalities the data has; linked from ``data.modalities`` by the CLI, so that with no
            ``encoders`` named the columns decide which encoders are built.
        fusion_head: registered fusion head; None = ``concat`` for a new model, the loaded head under ``init_from``.
        head_options: the head's keyword options; None = {} (or the loaded ones under ``init_from``).
        stage: ``early`` | ``late`` | ``hybrid`` fusion (docs/stages.md).
        task: ``multiclass`` | ``multilabel`` | ``regression``.
        hidden_dim: shared width D of projections, fused vector and trunk.
        trunk_layers: layers of the trunk after the head.
        dropout: dropout in projections, trunk and task heads.
        modality_dropout: modality -> probability of hiding it for a training sample (a float: every modality;
            None, in checkpoints of older releases: 0).
        late_loss_weight: weight of the mean per-modality loss (late and hybrid stages).
        late_decision: what the late stage fuses: decision ``embedding``s or per-modality ``logits``.
        fuse_tokens: early/hybrid: fuse every modality's tokens (True) or one pooled vector each (False).
        standardize: standardise each modality's features with its pooled training statistics (set when a fit
            starts from the cached training features; kept from ``init_from`` models and resumed checkpoints).
        modularity: weights of the modular objectives, ``{"affinity": a, "dispersion": d, "compactness": c}``
            (``zoo.modular.modularity_losses``; logged each epoch as ``train/modularity/*``); None = plain training.
        lr: peak learning rate of the heads, LoRA adapters and encoders trained from scratch.
        encoder_lr: peak learning rate of the fine-tuned weights of pretrained encoders.
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        warmup_ratio: fraction of the training steps with linear warm-up before the cosine decay.
        class_weights: per-class loss weights for imbalanced data: None, ``"balanced"`` (from the training
            split's label counts when a fit starts), a list (one per label) or a dict label -> weight.
        init_from: a zoo name or saved folder to start from (its encoders, stage and weights are kept).
        train_only_head: train only ``model.head_parameters()``; None = True when ``init_from`` swapped the head.
        probe_encoders: with no ``encoders`` named, let ``fit`` choose each modality's encoder among its offline
            candidates by a quick probe on the data's validation split (``recipes.probe``); False keeps the
            defaults (``DEFAULT_ENCODERS``).
        probe_head: with no ``hidden_dim`` or ``head_options`` set and a training split small enough to probe
            whole, let ``fit`` choose between the default head and the compact one (half the width, a linear
            concat) on the validation split; False keeps the default.
        config: a resolved ``FusionModelConfig.to_dict()``; when given the model is built from it alone
            (this is how a ``.ckpt`` rebuilds itself) and the model-shape arguments above are ignored.
    """

    #: test split's confusion counts [true, predicted] (multiclass), set during ``test``
    test_confusion: Tensor | None = None

    def __init__(
        self,
        encoders: dict[str, Any] | None = None,
        labels: list[str] | None = None,
        modalities: list[str] | None = None,
        fusion_head: str | None = None,
        head_options: dict[str, Any] | None = None,
        stage: Literal["early", "late", "hybrid"] = _M["stage"],
        task: Literal["multiclass", "multilabel", "regression"] = _M["task"],
        hidden_dim: int = _M["hidden_dim"],
        trunk_layers: int = _M["trunk_layers"],
        dropout: float = _M["dropout"],
        modality_dropout: dict[str, float] | float | None = _M["modality_dropout"],
        late_loss_weight: float = _M["late_loss_weight"],
        late_decision: Literal["embedding", "logits"] = _M["late_decision"],
        fuse_tokens: bool = _M["fuse_tokens"],
        standardize: bool = _M["standardize"],
        modularity: dict[str, float] | None = _M["modularity"],
        lr: float = _O["lr"],
        encoder_lr: float = _O["encoder_lr"],
        weight_decay: float = _O["weight_decay"],
        warmup_ratio: float = _O["warmup_ratio"],
        class_weights: str | list[float] | dict[str, float] | None = _O["class_weights"],
        init_from: str | None = None,
        train_only_head: bool | None = None,
        probe_encoders: bool = True,
        probe_head: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        args = {k: copy.deepcopy(v) for k, v in locals().items() if k in inspect.signature(FusionTask).parameters}
        self.optim = OptimConfig(lr=lr, encoder_lr=encoder_lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                                 class_weights=copy.deepcopy(class_weights))
        swapped = False
        #: whether ``fit`` may choose the encoders (none named, no model to start from); the probe's report
        self.probe = bool(probe_encoders and encoders is None and config is None and not init_from)
        #: ... and the head's width (none set: the default width or the compact head, on small data)
        self.probe_head = bool(probe_head and config is None and not init_from and head_options is None
                               and hidden_dim == _M["hidden_dim"])
        self.encoder_probe: dict[str, Any] | None = None
        if config is not None:
            self.model = FusionModel(FusionModelConfig.from_dict(config))
        elif init_from:
            self.model = FusionModel.from_pretrained(init_from)
            want_head = fusion_head or self.model.config.fusion_head
            kept = self.model.config.head_options if want_head == self.model.config.fusion_head else {}
            want_options = dict(kept if head_options is None else head_options)  # a new head: its own defaults
            if (want_head, want_options) != (self.model.config.fusion_head, dict(self.model.config.head_options)):
                self.model.swap_fusion_head(want_head, **want_options)
                swapped = True
        else:
            if encoders is None:
                have = [m for m in (modalities or sorted(DEFAULT_ENCODERS)) if m in DEFAULT_ENCODERS]
                if not have:
                    raise ConfigError(f"the data has none of the modalities {sorted(DEFAULT_ENCODERS)}; map a column "
                                      "with --data.columns '{\"text\": \"<column>\"}' or name --model.encoders.")
                encoders = {m: DEFAULT_ENCODERS[m] for m in have}
            if not labels:
                raise ConfigError("FusionTask needs labels: in Python build it with FusionTask.for_data(dm, ...) or "
                                  "pass labels=dm.labels (CLI: --model.labels, or a data module that sets them).")
            given: dict[str, Any] = {"fusion_head": fusion_head, "head_options": head_options}
            cfg = FusionModelConfig(
                encoders=dict(encoders), labels=tuple(labels), stage=stage, task=task, hidden_dim=hidden_dim,
                trunk_layers=trunk_layers, dropout=dropout,
                modality_dropout=0.0 if modality_dropout is None else copy.deepcopy(modality_dropout),
                late_loss_weight=late_loss_weight, late_decision=late_decision, fuse_tokens=fuse_tokens,
                standardize=standardize, modularity=copy.deepcopy(modularity),
                **{k: v for k, v in given.items() if v is not None},  # None: the config's default
            )
            self.model = FusionModel(cfg)
        have = list(self.model.config.labels)
        if labels and [str(x) for x in labels] != have:
            source = "init_from model" if init_from and config is None else "config"
            raise ConfigError(f"labels {list(labels)} from the data differ from the {source}'s labels {have}; "
                              "use data with the same labels or start a new model (drop init_from/config).")
        self.train_only_head = bool(train_only_head if train_only_head is not None else swapped)
        if self.train_only_head:
            self.model.requires_grad_(False)
            for p in self.model.head_parameters():
                p.requires_grad_(True)
        self.cfg: FusionModelConfig = self.model.config
        args["config"] = self.cfg.to_dict()
        self.save_hyperparameters(args)
        self._init_metrics()
        if class_weights is not None:  # checked now, before any data is read or encoded
            if class_weights != "balanced":
                self.use_class_weights()
            elif self.cfg.task == "regression":
                class_weight_tensor(class_weights, list(self.cfg.labels), self.cfg.task)  # raises: not regression

    #: per-class loss weights [C] (``class_weights``), None = unweighted; "balanced" is resolved in ``setup``
    loss_weight: Tensor | None = None

    def _init_metrics(self) -> None:
        """Metrics per split: fused (+ each modality alone on test), and each late head in late/hybrid."""
        c, groups, task_ = self.cfg.num_outputs, self.cfg.modalities, self.cfg.task
        heads = groups if self.cfg.stage in ("late", "hybrid") else []
        self.split_metrics = nn.ModuleDict({
            "val": SplitMetrics(task_, c, ["fused"], heads),
            "test": SplitMetrics(task_, c, ["fused", *groups], heads),
        })
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def for_data(cls, datamodule: Any, **kwargs: Any) -> FusionTask:
        """A task for ``datamodule``'s data: its labels and modalities, as ``fusion-zoo fit`` links them.

        Keyword arguments are FusionTask's (``encoders``, ``fusion_head``, ``stage``, ...); with no ``encoders``
        each modality the data has gets its default encoder (the CLI's encoder probe runs only in ``fit``).
        """
        labels, modalities = getattr(datamodule, "labels", None), getattr(datamodule, "modalities", None)
        if not labels:
            raise ConfigError(f"{type(datamodule).__name__} has no labels; pass labels=[...] to FusionTask instead.")
        return cls(**{"labels": list(labels), "modalities": modalities, **kwargs})

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> FusionTask:
        """Rebuild a task and its weights from a Lightning ``.ckpt`` (loaded with ``weights_only=True``)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist; look under <run_dir>/checkpoints/.")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{str(path)!r} is not a readable Lightning checkpoint ({e}).") from e
        hparams = ckpt.get("hyper_parameters") or {}
        if "config" not in hparams or "state_dict" not in ckpt:
            raise CheckpointError(f"{str(path)!r} was not written by FusionTask (no hyper_parameters.config).")
        names = set(inspect.signature(cls).parameters)
        task = cls(**{k: v for k, v in hparams.items() if k in names and k not in ("init_from", "labels")})
        task._restore_encoders(ckpt, str(path))
        task.load_state_dict(ckpt["state_dict"])
        return task

    # lean checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what training changes: encoders rebuilt from the registry (frozen; LoRA's base weights) go by
        name + weights sha256, as in a model folder (``zoo.convert.lean_state_dict``)."""
        checkpoint["state_dict"], checkpoint[ENCODERS_KEY] = lean_state_dict(self.model, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refill the referenced encoder weights from this task's encoders after checking their sha256."""
        self._restore_encoders(checkpoint, "checkpoint")

    def _restore_encoders(self, checkpoint: dict[str, Any], where: str) -> None:
        records = checkpoint.get(ENCODERS_KEY)
        if records:
            checkpoint["state_dict"] = fill_state_dict(self.model, checkpoint["state_dict"], records, where)

    def train(self, mode: bool = True) -> FusionTask:
        """Train mode for what trains; every frozen sub-module (all its parameters fixed: frozen encoders, the
        projections and ``late_encoders`` under ``train_only_head``, ...) stays in eval mode, so its dropout
        is off and its BatchNorm statistics stay fixed."""
        super().train(mode)
        if mode:
            _eval_frozen(self.model)
        return self

    def forward(self, inputs: dict[str, Any]) -> FusionModelOutput:
        return self.model(inputs)

    # losses ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Resolve ``class_weights`` (explicit ones at once; ``"balanced"`` from the data module's training
        labels when a fit starts) and say what they are."""
        spec = self.optim.class_weights
        if spec is None or self.loss_weight is not None:
            return
        train_labels = None
        if spec == "balanced":
            if stage != "fit":
                return  # evaluation alone: the loss stays unweighted, the metrics do not depend on it
            datamodule = getattr(self._trainer, "datamodule", None)
            if not callable(getattr(datamodule, "train_labels", None)):
                raise ConfigError("class_weights='balanced' counts the training labels of a FusionDataModule; with "
                                  "another data source give the weights (a list or a dict label -> weight).")
            train_labels = datamodule.train_labels()  # type: ignore[union-attr]
        self.use_class_weights(train_labels)

    def on_fit_start(self) -> None:
        """Set the feature standardisation (``standardize``) from the training split's cached features, once: a
        resumed or ``init_from`` model keeps the statistics it was trained with."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if getattr(self.model, "feature_norm", None) is None or not callable(getattr(datamodule, "train_features",
                                                                                      None)):
            return
        done = self.model.fit_feature_norm(datamodule.train_features())  # type: ignore[union-attr]
        if done:
            rank_zero_info(f"features standardised with training statistics: {', '.join(done)}")

    def use_class_weights(self, train_labels: Tensor | None = None, announce: bool = True) -> Tensor | None:
        """Set ``loss_weight`` [C] from ``class_weights`` (``train_labels`` [N] | [N, C]: needed for "balanced")."""
        spec = self.optim.class_weights
        weight = class_weight_tensor(spec, list(self.cfg.labels), self.cfg.task, train_labels)
        self.loss_weight = None if weight is None else weight.to(self.device)
        if weight is not None:
            self.hparams["class_weights"] = weight.tolist()  # checkpoints rebuild with these very weights
            if announce:
                shown = ", ".join(f"{n} {w:.3g}" for n, w in zip(self.cfg.labels, weight.tolist(), strict=True))
                rank_zero_info(f"class weights ({spec if isinstance(spec, str) else 'given'}): {shown}")
        return self.loss_weight

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        w = self.loss_weight
        if w is not None and w.device != logits.device:
            w = self.loss_weight = w.to(logits.device)
        return task_loss(self.cfg.task, logits, labels, w)

    def _late_loss(self, out: FusionModelOutput, labels: Tensor) -> Tensor:
        """Mean over modalities of each late head's loss on the samples that have that modality."""
        losses = [self._loss(z[out.present[m]], labels[out.present[m]])
                  for m, z in out.modality_logits.items() if bool(out.present[m].any())]
        return torch.stack(losses).mean() if losses else out.logits.new_zeros(())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = batch["labels"]
        out = self.model(batch["inputs"])
        task_loss = self._loss(out.logits, labels)
        late_loss = self._late_loss(out, labels)
        loss = task_loss + self.cfg.late_loss_weight * late_loss + out.aux_loss
        loss = loss + self._modularity_loss(out, labels)
        if not torch.isfinite(loss):
            raise FusionZooError(
                f"training loss is {loss.item()} at batch {batch_idx} (epoch {self.current_epoch}, global step "
                f"{self.global_step}; task {task_loss.item():.4g}, late {late_loss.item():.4g}, aux "
                f"{out.aux_loss.item():.4g}); lower the learning rate, e.g. --model.lr {_lower_lr(self.optim.lr):g}, "
                "or clip gradients with --trainer.gradient_clip_val 1.0."
            )
        b = labels.shape[0]
        if self._step_is_logged():
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("train/task_loss", task_loss, batch_size=b)
            if out.modality_logits:
                self.log("train/late_loss", late_loss, batch_size=b)
            for key, value in out.aux.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    self.log(f"train/aux/{key}", value.detach().float().reshape(()), batch_size=b)
        self._log_routing(out.aux, b)
        return loss

    def _modularity_loss(self, out: FusionModelOutput, labels: Tensor) -> Tensor:
        """The weighted modular objectives on the head side's units (``modularity``), each logged as an epoch
        mean; 0 without ``modularity``."""
        weights = self.cfg.modularity
        if not weights or not out.units:
            return out.logits.new_zeros(())
        terms = modularity_losses(out.units, labels)
        b = labels.shape[0]
        sums = self.__dict__.setdefault("_modularity_sums", {})  # summed here, logged once an epoch (a log
        for key, value in terms.items():  # call per step costs as much as a head-only step)
            sums[key] = sums.get(key, 0.0) + value.detach() * b
        sums["n"] = sums.get("n", 0) + b
        return sum((weights.get(k, 0.0) * v for k, v in terms.items()), out.logits.new_zeros(()))

    def on_train_epoch_end(self) -> None:
        """Log the epoch means of the modular objectives (``train/modularity/<name>``)."""
        sums = self.__dict__.pop("_modularity_sums", None)
        if sums and sums.get("n"):
            n = sums.pop("n")
            for key, value in sums.items():
                self.log(f"train/modularity/{key}", value / n, on_step=False, on_epoch=True)

    def _step_is_logged(self) -> bool:
        """Whether this training step's scalars are logged: on the steps the loggers write (every
        ``--trainer.log_every_n_steps``) and on each epoch's last batch (for the progress bar and epoch callbacks).

        A ``self.log`` call costs ~1.5 ms on CPU, as much as the rest of a head-only step on cached features, and
        a value logged on any other step is never written anywhere.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_logger_connector", None)  # Lightning's own "write logs now?" test
        return bool(getattr(connector, "should_update_logs", True) or getattr(trainer, "fast_dev_run", False)
                    or trainer.is_last_batch)

    def _log_routing(self, aux: dict[str, Tensor], b: int) -> None:
        """MoE telemetry, epoch means: each expert's share of the routed tokens, and the routing entropy (nats;
        log(num_experts) = uniform routing, 0 = every sample sent to one expert: module collapse)."""
        util = aux.get("expert_utilisation")
        if isinstance(util, Tensor) and util.dim() == 1:
            for e, u in enumerate(util.detach().float()):
                self.log(f"train/moe/utilisation_{e}", u, batch_size=b, on_step=False, on_epoch=True)
        probs = aux.get("routing_probs")
        if isinstance(probs, Tensor) and probs.dim() == 2:
            p = probs.detach().float()
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)  # [B, E] per sample (summed over its tokens)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            self.log("train/moe/routing_entropy", entropy, batch_size=b, on_step=False, on_epoch=True)

    # evaluation --------------------------------------------------------------------------------
    def _eval_step(self, split: str, batch: dict[str, Any]) -> None:
        inputs, labels = batch["inputs"], batch["labels"]
        metrics = cast(SplitMetrics, self.split_metrics[split])
        out = self.model(inputs)
        if not torch.isfinite(out.logits).all():
            raise FusionZooError(
                f"the model produced NaN/inf predictions in {SPLITS[split]} batch (indices "
                f"{batch.get('index', torch.tensor([])).tolist()[:8]}...); check those rows' inputs and the weights."
            )
        self.log(f"{split}/loss", self._loss(out.logits, labels), batch_size=labels.shape[0], sync_dist=True)
        metrics.update("fused", out.logits, labels)
        if split == "test" and self.cfg.task == "multiclass":  # for the run folder's confusion matrix plot
            c = out.logits.shape[-1]
            pairs = labels.long() * c + out.logits.argmax(-1)
            counts = torch.bincount(pairs, minlength=c * c).view(c, c).cpu()  # [true, predicted]
            self.test_confusion = counts if self.test_confusion is None else self.test_confusion + counts
        for m, z in out.modality_logits.items():
            metrics.update(m, z[out.present[m]], labels[out.present[m]], head=True)
        if split == "test":  # missing-modality protocol: the fused model fed each modality alone
            for m in sorted(inputs):
                alone = self.model({m: inputs[m]})
                keep = alone.present[m]
                metrics.update(m, alone.logits[keep], labels[keep])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_epoch_end(self, split: str) -> None:
        metrics = cast(SplitMetrics, self.split_metrics[split])
        results = metrics.compute()
        metrics.reset()
        for group, row in results.items():
            for name, value in row.items():
                if name != "n":
                    bar = group == "fused" and name in ("accuracy", "mae")
                    self.log(f"{split}/{group}/{name}", value, sync_dist=True, prog_bar=bar)
        if not self.trainer.sanity_checking:
            self.results[SPLITS[split]] = results

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self.test_confusion = None

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
        if self.cfg.task == "multiclass" and self.trainer.world_size > 1:  # every rank saw its share of the rows
            c = self.model.config.num_outputs
            mine = self.test_confusion if self.test_confusion is not None else torch.zeros(c, c, dtype=torch.long)
            gathered = cast(Tensor, self.all_gather(mine.to(self.device)))  # one tensor in, one tensor out
            self.test_confusion = gathered.reshape(-1, c, c).sum(0).cpu()

    # optimisation ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups; no weight decay on 1-D parameters.

        ``encoders`` (pretrained encoder weights being fine-tuned) train at ``encoder_lr``; ``adapters`` (LoRA
        adapters, which start at zero, and encoders trained from scratch, ``Encoder.pretrained = False``) and
        ``heads`` (everything else) at ``lr``: a small fine-tuning rate would leave new weights barely moved.
        """
        opt = self.optim
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = "heads"
            if name.startswith("encoders."):
                _, m, rest = name.split(".", 2)
                fresh = is_lora_key(rest) or not getattr(self.model.encoders[m], "pretrained", True)
                part = "adapters" if fresh else "encoders"
            groups.setdefault((part, p.ndim >= 2), []).append(p)
        return [
            {"name": f"{part}{'' if decay else '_no_decay'}", "params": params,
             "lr": opt.encoder_lr if part == "encoders" else opt.lr,
             "weight_decay": opt.weight_decay if decay else 0.0}
            for (part, decay), params in sorted(groups.items())
        ]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        groups = self.param_groups()
        if not groups:
            raise ConfigError("no trainable parameters: unfreeze an encoder or set --model.train_only_head false.")
        # the fused kernel (one call for all tensors) on CPU/CUDA: ~20% of a head-only step on cached features
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=fused or None)
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "streaming", False) and getattr(datamodule, "train_size", 0) is None:
            # a stream of unknown length: no step count, and counting would start the loader before a resume
            # hands it its position (Lightning fetches such a loader one batch ahead)
            total = math.inf
        else:
            total = float(self.trainer.estimated_stepping_batches)
        warmup = int(self.optim.warmup_ratio * total) if math.isfinite(total) else 0

        def schedule(step: int) -> float:
            return warmup_cosine(step, total, warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
