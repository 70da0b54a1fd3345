"""Training-only settings: one typed home for the optimizer, schedule and loss values (``--model.lr`` ...).

The model's own settings live in :class:`zoo.config.FusionModelConfig`; :class:`recipes.task.FusionTask` and the
sweep (``recipes/sweep/``) build both dataclasses, so each setting has one default and one validation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fusion_errors import ConfigError
from zoo.config import dataclass_from_dict

__all__ = ["OptimConfig"]


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value} must be a finite number > 0 (e.g. --model.{name} 1e-3).")


def _check_class_weights(spec: Any) -> None:
    fix = "use 'balanced', a list with one weight per label, or a dict label -> weight (e.g. {\"rare\": 5})."
    if spec is None or spec == "balanced":
        return
    if isinstance(spec, str):
        raise ConfigError(f"class_weights={spec!r} is not known; {fix}")
    values = list(spec.values()) if isinstance(spec, dict) else spec if isinstance(spec, (list, tuple)) else None
    if not values:
        raise ConfigError(f"class_weights={spec!r} is empty or of the wrong type; {fix}")
    for v in values:
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ConfigError(f"class_weights has {v!r}; every weight must be a finite number > 0.")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (docs/recipes.md "Learning rates and schedule").

    Attributes:
        lr: peak learning rate of the heads, LoRA adapters and encoders trained from scratch.
        encoder_lr: peak learning rate of the fine-tuned weights of pretrained encoders.
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        warmup_ratio: fraction of the training steps with linear warm-up before the cosine decay.
        class_weights: weights of the classes in the loss, for imbalanced data: None (every sample counts the
            same), ``"balanced"`` (multiclass: N / (C * n_c) from the training split's counts; multilabel: each
            label's positives weighted by negatives / positives), a list with one weight per label, or a dict
            label -> weight (labels left out weigh 1). Not for regression.
    """

    lr: float = 1e-3
    encoder_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    class_weights: str | list[float] | dict[str, float] | None = None

    def __post_init__(self) -> None:
        """One-line ConfigErrors for values that would train wrongly (lr < 0 is gradient ascent)."""
        _positive("lr", self.lr)
        _positive("encoder_lr", self.encoder_lr)
        wd = self.weight_decay
        if not (isinstance(wd, (int, float)) and not isinstance(wd, bool) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"weight_decay={wd} must be a finite number >= 0.")
        wr = self.warmup_ratio
        if not (isinstance(wr, (int, float)) and not isinstance(wr, bool) and 0 <= wr < 1):
            raise ConfigError(f"warmup_ratio={wr} must be in [0, 1).")
        _check_class_weights(self.class_weights)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "optim") -> OptimConfig:
        """Build from a mapping; an unknown key names the closest known one."""
        return dataclass_from_dict(cls, dict(data), where)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
