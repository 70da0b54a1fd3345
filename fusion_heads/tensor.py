"""``tensor``: tensor fusion (TFN, Zadeh et al. 2017).

``z_m = [W_m x_m + b_m; 1]`` (pooled features projected to ``proj_dim`` with a constant 1 appended),
``Z = z_1 (x) z_2 (x) ... (x) z_M`` (outer product, flattened to ``prod_m (proj_dim + 1)`` entries), and
``fused = W_o Z + b_o``. The appended 1 keeps every lower-order term: ``Z`` holds each ``z_m`` alone, every
pairwise product and so on, up to the full M-way product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput

MAX_TENSOR_SIZE = 1 << 20  # flattened outer-product entries; beyond this use ``low_rank``


@register_fusion_head("tensor")
class TensorFusion(FusionHead):
    """Outer product of ``[projection; 1]`` vectors, then a linear map (or MLP) to ``out_dim``.

    Args:
        proj_dim: width each modality is projected to before the outer product. The product has
            ``(proj_dim + 1) ** M`` entries (729 for 3 modalities at the default 8), so keep it small.
        hidden_dim: hidden width of an MLP after the product; 0 means one linear map.
        dropout: dropout on the flattened product.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        proj_dim: int = 8,
        hidden_dim: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        if proj_dim < 1:
            raise ConfigError(f"tensor: proj_dim={proj_dim} must be >= 1.")
        size = (proj_dim + 1) ** len(self.modalities)
        if size > MAX_TENSOR_SIZE:
            raise ConfigError(
                f"tensor: proj_dim={proj_dim} with {len(self.modalities)} modalities makes a {size}-entry product; "
                f"lower proj_dim or use the 'low_rank' head."
            )
        self.proj_dim, self.hidden_dim = proj_dim, hidden_dim
        self.tensor_size = size
        self.proj = nn.ModuleDict({m: nn.Linear(d, proj_dim) for m, d in self.modality_dims.items()})
        self.dropout = nn.Dropout(dropout)
        if hidden_dim > 0:
            self.out: nn.Module = nn.Sequential(nn.Linear(size, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        else:
            self.out = nn.Linear(size, out_dim)

    def product(self, inputs: dict[str, ModalityOutput]) -> Tensor:
        """Flattened outer product [B, (proj_dim + 1) ** M]; modality order is sorted, the last varies fastest."""
        z: Tensor | None = None
        for m in self.modalities:
            zm = self.proj[m](inputs[m].pooled)  # [B, P]
            zm = torch.cat([zm, zm.new_ones(zm.shape[0], 1)], dim=-1)  # [B, P+1]
            z = zm if z is None else (z[:, :, None] * zm[:, None, :]).flatten(1)  # [B, prod so far]
        assert z is not None
        return z

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        z = self.product(inputs)  # [B, (P+1)^M]
        return FusionOutput(fused=self.out(self.dropout(z)))  # [B, out_dim]

    def extra_config(self) -> dict[str, Any]:
        return {"proj_dim": self.proj_dim, "hidden_dim": self.hidden_dim, "tensor_size": self.tensor_size}
