"""``cross_attention``: modality tokens attend to the other modalities' tokens.

Tokens of modality ``m`` are projected to ``d_model`` (``x_m = W_m t_m``), then each layer applies, per target
modality, a post-norm cross-attention block ``x = LN(x + MHA(x, c, c)); x = LN(x + FFN(x))`` whose context ``c``
(keys and values, padding masked out) is:

* ``mode="all"``: the concatenated current tokens of every other modality (all targets updated together);
* ``mode="mult"`` (MulT, Tsai et al. 2019): one crossmodal stack per ordered pair ``(m, n)``, ``m != n``, whose
  context is the fixed projected tokens of ``n``; the ``M - 1`` outputs of ``m`` are concatenated and mapped
  back to ``d_model``.

With a single modality the context is the modality itself (self-attention). Each modality is then mean-pooled
over its valid tokens and ``fused = W_o [pool_1; ...; pool_M]``; the final tokens are returned too.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


class CrossBlock(nn.Module):
    """Post-norm block: ``x = LN(x + MHA(x, ctx)); x = LN(x + FFN(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        """x [B, T, D] attends to ctx [B, S, D] where ctx_mask [B, S] is True; returns [B, T, D]."""
        a, _ = self.attn(x, ctx, ctx, key_padding_mask=~ctx_mask, need_weights=False)  # [B, T, D]
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.ffn(x)))


@register_fusion_head("cross_attention")
class CrossAttentionFusion(FusionHead):
    """Cross-modal attention over tokens (``all`` others at once, or MulT-style ordered pairs).

    Args:
        mode: ``all`` (attend to every other modality's tokens) or ``mult`` (pairwise crossmodal stacks).
        d_model: attention width; 0 uses ``out_dim``. Must be divisible by ``num_heads``.
        num_heads: attention heads.
        layers: blocks per target modality (``all``) or per ordered pair (``mult``).
        ffn_mult: FFN hidden width as a multiple of ``d_model``.
        dropout: dropout in attention and after each sub-block.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        mode: Literal["all", "mult"] = "all",
        d_model: int = 0,
        num_heads: int = 4,
        layers: int = 1,
        ffn_mult: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        dim = d_model if d_model > 0 else out_dim
        if mode not in ("all", "mult"):
            raise ConfigError(f"cross_attention: mode={mode!r} is not 'all' or 'mult'.")
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(
                f"cross_attention: d_model={dim} is not divisible by num_heads={num_heads}; "
                "choose num_heads dividing d_model (or out_dim when d_model=0)."
            )
        if layers < 1:
            raise ConfigError(f"cross_attention: layers={layers} must be >= 1.")
        self.mode, self.dim, self.num_heads, self.layers = mode, dim, num_heads, layers
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.modality_dims.items()})
        ms = self.modalities

        def stack() -> nn.ModuleList:
            return nn.ModuleList(CrossBlock(dim, num_heads, ffn_mult, dropout) for _ in range(layers))

        if mode == "all":
            self.blocks = nn.ModuleDict({m: stack() for m in ms})
        else:
            self.pairs = nn.ModuleDict({self.pair(m, n): stack() for m in ms for n in self.sources(m)})
            self.merge = nn.ModuleDict({m: nn.Linear(len(self.sources(m)) * dim, dim) for m in ms})
        self.out = nn.Linear(len(ms) * dim, out_dim)
        self.token_out: nn.Module = nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim)

    def sources(self, m: str) -> list[str]:
        """Modalities that ``m`` attends to: the others, or itself when it is the only one."""
        return [n for n in self.modalities if n != m] or [m]

    @staticmethod
    def pair(m: str, n: str) -> str:
        return f"{m}_from_{n}"

    @staticmethod
    def stack(stacks: nn.ModuleDict, key: str) -> nn.ModuleList:
        return cast(nn.ModuleList, stacks[key])

    def attend(self, x: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Projected tokens by modality [B, T_m, D] -> updated tokens [B, T_m, D]."""
        if self.mode == "all":
            h = dict(x)
            for i in range(self.layers):
                ctx = {m: torch.cat([h[n] for n in self.sources(m)], dim=1) for m in self.modalities}  # [B, S, D]
                ctx_mask = {m: torch.cat([masks[n] for n in self.sources(m)], dim=1) for m in self.modalities}
                h = {m: self.stack(self.blocks, m)[i](h[m], ctx[m], ctx_mask[m]) for m in self.modalities}
            return h
        out = {}
        for m in self.modalities:
            per_source = []
            for n in self.sources(m):
                y = x[m]
                for block in self.stack(self.pairs, self.pair(m, n)):
                    y = block(y, x[n], masks[n])  # [B, T_m, D]
                per_source.append(y)
            out[m] = self.merge[m](torch.cat(per_source, dim=-1))  # [B, T_m, D]
        return out

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        masks = {m: inputs[m].mask for m in self.modalities}
        x = {m: self.proj[m](inputs[m].tokens) for m in self.modalities}  # [B, T_m, D]
        h = self.attend(x, masks)
        pooled = torch.cat([self.masked_mean(h[m], masks[m]) for m in self.modalities], dim=-1)  # [B, M*D]
        token_mask = torch.cat([masks[m] for m in self.modalities], dim=1)  # [B, sum T_m]
        tokens = self.token_out(torch.cat([h[m] for m in self.modalities], dim=1))  # [B, sum T_m, out_dim]
        tokens = tokens.masked_fill(~token_mask[..., None], 0.0)
        return FusionOutput(fused=self.out(pooled), tokens=tokens, token_mask=token_mask)

    def extra_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "d_model": self.dim, "num_heads": self.num_heads, "layers": self.layers}
