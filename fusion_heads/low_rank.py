"""``low_rank``: low-rank multimodal fusion (LMF, Liu et al. 2018).

Each modality has ``rank`` factors ``W_m^(i)`` of shape ``[D_m + 1, out_dim]``. With ``z_m = [x_m; 1]``,
``fused = sum_i w_i * prod_m (z_m W_m^(i)) + b`` (elementwise product over modalities). This equals tensor
fusion (``tensor``) with its weight tensor restricted to rank ``rank``, at a cost linear in the number of
modalities instead of exponential.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


@register_fusion_head("low_rank")
class LowRankFusion(FusionHead):
    """Rank-``rank`` factorised tensor fusion of pooled features.

    Args:
        rank: number of rank-1 terms ``i`` summed with learned weights ``w_i``.
        dropout: dropout on each ``z_m W_m^(i)`` before the product.
    """

    def __init__(self, modality_dims: dict[str, int], out_dim: int, rank: int = 4, dropout: float = 0.0) -> None:
        super().__init__(modality_dims, out_dim)
        if rank < 1:
            raise ConfigError(f"low_rank: rank={rank} must be >= 1.")
        self.rank = rank
        # scaled so each factor output has unit-ish variance; a product of M such terms stays O(1)
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(rank, d + 1, out_dim) / (d + 1) ** 0.5) for m, d in self.modality_dims.items()}
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.dropout = nn.Dropout(dropout)

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        prod: Tensor | None = None
        for m in self.modalities:
            x = inputs[m].pooled  # [B, D]
            z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)  # [B, D+1]
            fm = self.dropout(torch.einsum("bd,rdo->bro", z, self.factors[m]))  # [B, R, out]
            prod = fm if prod is None else prod * fm  # [B, R, out]
        assert prod is not None
        fused = torch.einsum("bro,r->bo", prod, self.rank_weights) + self.bias  # [B, out_dim]
        return FusionOutput(fused=fused)

    def extra_config(self) -> dict[str, Any]:
        return {"rank": self.rank}
