"""``gating``: the gated multimodal unit (GMU, Arevalo et al. 2017) for any number of modalities.

``h_m = tanh(W_m x_m)`` (pooled features to a hidden width ``H``), gate logits ``g = W_z [x_1; ...; x_M] + b_z``,
gates ``z = softmax(g)`` over modalities (per sample, or per sample and hidden unit with ``per_unit=True``),
``h = sum_m z_m * h_m`` and ``fused = W_o h`` (or ``fused = h`` when ``hidden_dim=0``, with ``H = out_dim``).
For two modalities the softmax equals the paper's ``z = sigmoid(g_1 - g_2)``, ``h = z h_1 + (1 - z) h_2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


@register_fusion_head("gating")
class GatedFusion(FusionHead):
    """GMU over N modalities; the gates see every modality (missing ones as their learned embedding).

    Args:
        hidden_dim: width ``H`` of the gated hidden ``h``; 0 uses ``out_dim`` and no output layer.
        per_unit: one gate per modality and hidden unit (``z`` is [B, M, H], as in the paper's vector gate)
            instead of one per modality (``z`` is [B, M]); ``aux["gates"]`` is then the mean over units.
        dropout: dropout on ``h`` before the output layer.
        floor: gates are ``(1 - floor) * softmax + floor / M``: every modality keeps at least ``floor / M`` of the
            mix, so a gate cannot close on a modality entirely.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        hidden_dim: int = 0,
        per_unit: bool = False,
        dropout: float = 0.0,
        floor: float = 0.0,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        if not 0.0 <= floor < 1.0:
            raise ConfigError(f"floor={floor} must be in [0, 1): the share of the mix spread evenly over modalities.")
        self.floor = float(floor)
        hidden = hidden_dim if hidden_dim > 0 else out_dim
        self.hidden_dim, self.per_unit = hidden_dim, per_unit
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden, bias=False) for m, d in self.modality_dims.items()})
        num = len(self.modalities)
        self.gate = nn.Linear(sum(self.modality_dims.values()), num * hidden if per_unit else num)
        self.dropout = nn.Dropout(dropout)
        self.out: nn.Module = nn.Linear(hidden, out_dim) if hidden_dim > 0 else nn.Identity()

    def gates(self, inputs: dict[str, ModalityOutput]) -> Tensor:
        """Gates [B, M] or [B, M, H] (``per_unit``), summing to 1 over modalities."""
        cat = torch.cat([inputs[m].pooled for m in self.modalities], dim=-1)  # [B, sum D_m]
        logits = self.gate(cat)  # [B, M] or [B, M*H]
        if self.per_unit:
            logits = logits.view(cat.shape[0], len(self.modalities), -1)  # [B, M, H]
        z = logits.softmax(dim=1)
        return z if self.floor == 0.0 else (1.0 - self.floor) * z + self.floor / len(self.modalities)

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        h = torch.stack([torch.tanh(self.proj[m](inputs[m].pooled)) for m in self.modalities], dim=1)  # [B, M, H]
        z = self.gates(inputs)  # [B, M] or [B, M, H]
        zb = z if self.per_unit else z[..., None]  # [B, M, H or 1]
        fused = self.out(self.dropout((zb * h).sum(dim=1)))  # [B, out_dim]
        return FusionOutput(fused=fused, aux={"gates": z.mean(-1) if self.per_unit else z})

    def extra_config(self) -> dict[str, Any]:
        return {"hidden_dim": self.hidden_dim, "per_unit": self.per_unit, "floor": self.floor}
