"""``average``: a weighted mean of per-modality projections.

``h_m = W_m x_m + b_m`` (pooled features of modality ``m`` mapped to ``out_dim``), weights
``w = softmax(a)`` over modalities, ``fused = sum_m w_m h_m``. The logits ``a`` are zeros (``uniform``),
one learned vector (``global``) or ``v . tanh(h_m)`` per sample (``per_sample``). With
``exclude_missing=True`` absent modalities get weight 0 and the rest are renormalised.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput

WEIGHTINGS = ("uniform", "global", "per_sample")


@register_fusion_head("average")
class AverageFusion(FusionHead):
    """Mean (uniform or learned weights) of the modalities' pooled features projected to ``out_dim``.

    Args:
        weighting: ``uniform`` (plain mean), ``global`` (one learned softmax weight per modality) or
            ``per_sample`` (weights computed from each sample's projected features).
        exclude_missing: drop absent modalities from the mean of each sample (renormalising the weights of
            the present ones). A sample with no modality present falls back to all missing embeddings.
            Default True: the mean of what is there, robust when training saw no missing data; set False
            to let the learned missing embedding take part (absence then shifts the mean).
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        weighting: Literal["uniform", "global", "per_sample"] = "uniform",
        exclude_missing: bool = True,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"average: weighting={weighting!r} is not one of {WEIGHTINGS}.")
        self.weighting = weighting
        self.exclude_missing = exclude_missing
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in self.modality_dims.items()})
        if weighting == "global":
            self.weight_logits = nn.Parameter(torch.zeros(len(self.modalities)))
        elif weighting == "per_sample":
            self.scorer = nn.Linear(out_dim, 1)

    def weights(self, projected: Tensor, present: Tensor) -> Tensor:
        """Mixing weights [B, M] from projected features [B, M, out_dim] and presence [B, M] bool."""
        if self.weighting == "uniform":
            logits = projected.new_zeros(projected.shape[:2])  # [B, M]
        elif self.weighting == "global":
            logits = self.weight_logits.expand(projected.shape[0], -1)  # [B, M]
        else:
            logits = self.scorer(torch.tanh(projected)).squeeze(-1)  # [B, M]
        if self.exclude_missing:
            keep = present | ~present.any(dim=1, keepdim=True)  # a sample with nothing present keeps all
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(dim=-1)

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        projected = torch.stack([self.proj[m](inputs[m].pooled) for m in self.modalities], dim=1)  # [B, M, out]
        here = torch.stack([present[m] for m in self.modalities], dim=1)  # [B, M]
        w = self.weights(projected, here)  # [B, M]
        fused = (w[..., None] * projected).sum(dim=1)  # [B, out_dim]
        return FusionOutput(fused=fused, aux={"weights": w})

    def extra_config(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "exclude_missing": self.exclude_missing}
