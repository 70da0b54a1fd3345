"""``concat``: concatenation of pooled features, then a linear map or an MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


@register_fusion_head("concat")
class ConcatFusion(FusionHead):
    """``fused = MLP(cat([pooled_m for m in sorted(modalities)]))``.

    The MLP is where feature-level fusion learns interactions between modalities (an answer that needs both the
    image and the question); a single linear map only adds the modalities' contributions.

    Args:
        hidden_dim: width of the MLP's hidden layer; None = 2 x ``out_dim``; 0 means a single linear map.
        dropout: dropout before the output layer.
    """

    def __init__(self, modality_dims: dict[str, int], out_dim: int, hidden_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(modality_dims, out_dim)
        total = sum(self.modality_dims.values())
        if hidden_dim is None:
            hidden_dim = 2 * out_dim
        if hidden_dim < 0:
            raise ConfigError(f"concat hidden_dim={hidden_dim} must be >= 0 (0: a single linear map).")
        if hidden_dim > 0:
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(total, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
            )
        else:
            self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(total, out_dim))

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        cat = torch.cat([inputs[m].pooled for m in self.modalities], dim=-1)  # [B, sum D_m]
        return FusionOutput(fused=self.proj(cat))  # [B, out_dim]
