"""``bottleneck``: attention bottlenecks (MBT, Nagrani et al. 2021).

Each modality's tokens are projected to ``d_model`` and prefixed with a learned CLS token of that modality.
``num_bottlenecks`` shared latent tokens ``b`` (learned initial values) carry all cross-modal information:
in each layer, modality ``m`` runs its own pre-norm transformer layer over ``[cls_m; x_m; b]`` (padding masked),
giving new ``cls_m, x_m`` and its own update ``b_m``; then ``b = mean_m b_m``. Finally
``fused = W_o [mean_m cls_m; mean_j b_j]`` and the bottleneck tokens, mapped to ``out_dim``, are returned.
With ``num_bottlenecks=0`` the modalities never interact and ``fused`` depends on the CLS tokens only.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


@register_fusion_head("bottleneck")
class BottleneckFusion(FusionHead):
    """Per-modality transformer layers that exchange information only through shared bottleneck tokens.

    Args:
        num_bottlenecks: shared latent tokens (0 turns off cross-modal exchange).
        layers: transformer layers per modality.
        d_model: width of the layers; 0 uses ``out_dim``. Must be divisible by ``num_heads``.
        num_heads: attention heads.
        ffn_mult: FFN hidden width as a multiple of ``d_model``.
        dropout: dropout inside the layers.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        num_bottlenecks: int = 4,
        layers: int = 2,
        d_model: int = 0,
        num_heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        dim = d_model if d_model > 0 else out_dim
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(
                f"bottleneck: d_model={dim} is not divisible by num_heads={num_heads}; "
                "choose num_heads dividing d_model (or out_dim when d_model=0)."
            )
        if layers < 1 or num_bottlenecks < 0:
            raise ConfigError(
                f"bottleneck: need layers >= 1 and num_bottlenecks >= 0, got layers={layers}, "
                f"num_bottlenecks={num_bottlenecks}."
            )
        self.dim, self.num_bottlenecks, self.layers = dim, num_bottlenecks, layers
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.modality_dims.items()})
        self.cls = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in self.modalities})
        self.bottlenecks = nn.Parameter(torch.randn(num_bottlenecks, dim) * 0.02) if num_bottlenecks else None

        def layer() -> nn.TransformerEncoderLayer:
            width = ffn_mult * dim
            return nn.TransformerEncoderLayer(dim, num_heads, width, dropout, batch_first=True, norm_first=True)

        self.blocks = nn.ModuleDict({m: nn.ModuleList(layer() for _ in range(layers)) for m in self.modalities})
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear((2 if num_bottlenecks else 1) * dim, out_dim)
        self.token_out: nn.Module = nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim)

    def encode(self, inputs: dict[str, ModalityOutput]) -> tuple[dict[str, Tensor], Tensor]:
        """Run the layers on complete inputs; returns final CLS tokens by modality [B, D] and bottlenecks [B, N, D]."""
        batch = inputs[self.modalities[0]].batch_size
        nb = self.num_bottlenecks
        x = {m: self.proj[m](inputs[m].tokens) for m in self.modalities}  # [B, T_m, D]
        ref = x[self.modalities[0]]
        b = ref.new_zeros(batch, 0, self.dim) if self.bottlenecks is None else self.bottlenecks.expand(batch, -1, -1)
        cls = {m: self.cls[m].expand(batch, 1, -1) for m in self.modalities}  # [B, 1, D]
        for i in range(self.layers):
            updates = []
            for m in self.modalities:
                mask = inputs[m].mask
                keep = torch.cat([mask.new_ones(batch, 1), mask, mask.new_ones(batch, nb)], dim=1)  # [B, 1+T+N]
                layer = cast(nn.ModuleList, self.blocks[m])[i]
                seq = layer(torch.cat([cls[m], x[m], b], dim=1), src_key_padding_mask=~keep)  # [B, 1+T+N, D]
                t = mask.shape[1]
                cls[m], x[m] = seq[:, :1], seq[:, 1 : 1 + t]
                updates.append(seq[:, 1 + t :])  # [B, N, D]
            b = torch.stack(updates).mean(0)  # [B, N, D]
        return {m: self.norm(cls[m][:, 0]) for m in self.modalities}, self.norm(b)

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        cls, b = self.encode(inputs)
        pooled = torch.stack([cls[m] for m in self.modalities]).mean(0)  # [B, D]
        if not self.num_bottlenecks:
            return FusionOutput(fused=self.out(pooled))
        fused = self.out(torch.cat([pooled, b.mean(1)], dim=-1))  # [B, out_dim]
        return FusionOutput(fused=fused, tokens=self.token_out(b))  # tokens [B, N, out_dim]

    def extra_config(self) -> dict[str, Any]:
        return {"num_bottlenecks": self.num_bottlenecks, "layers": self.layers, "d_model": self.dim}
