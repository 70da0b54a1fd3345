"""``small-cnn``: a small image CNN trained from scratch, for small images (digits, icons, thumbnails) on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusion_errors import ConfigError

from . import register_encoder
from ._blocks import ConvBlock
from ._contract import Encoder, ModalityOutput
from .image_pixels import PixelPreprocessor

__all__ = ["SmallCNNEncoder"]


class SmallCNNEncoder(Encoder):
    """Image resized to ``image_size`` (no crop) and standardised per image → conv blocks (each halves H and W) →
    linear to ``embed_dim``. tokens: [B, H'W', embed_dim] (the final feature map); pooled: their mean.

    Random initialisation: train it (``finetune="full"``) with the fused model; frozen it is a random projection.
    """

    modality = "image"

    def __init__(self, image_size: int = 32, color: str = "gray", channels: Sequence[int] = (32, 64, 128),
                 embed_dim: int = 128) -> None:
        super().__init__()
        if not channels or min(channels) < 1 or embed_dim < 1:
            raise ConfigError(f"channels={list(channels)} needs >= 1 positive width and embed_dim={embed_dim} >= 1.")
        if image_size < 2 ** len(channels):
            raise ConfigError(f"image_size={image_size} is too small for {len(channels)} blocks that each halve it; "
                              f"use image_size >= {2 ** len(channels)} or fewer channels.")
        self.preprocessor = PixelPreprocessor(image_size, color)
        self.embed_dim = int(embed_dim)
        widths = [self.preprocessor.channels, *channels]
        self.blocks = nn.ModuleList([ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.proj = nn.Linear(widths[-1], embed_dim)

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = self.proj.weight.device
        x = batch["pixels"].to(device)  # [B, C, S, S] in 0..1
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) / x.std((1, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-2)  # brightness/contrast out
        for block in self.blocks:
            x = block(x)  # [B, C', H/2, W/2]
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # [B, H'W', D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)  # [B, T]
        return ModalityOutput(tokens, mask, tokens.mean(1))

    def trainable_blocks(self) -> list[nn.Module]:
        return [*self.blocks, self.proj]


@register_encoder("small-cnn")
def small_cnn(image_size: int = 32, color: str = "gray", channels: list[int] | None = None,
              embed_dim: int = 128) -> SmallCNNEncoder:
    """A small CNN trained from scratch (random init; no pretrained weights). Use ``finetune="full"``.

    Args:
        image_size: input side in pixels (the whole image is resized, no crop).
        color: ``gray`` or ``rgb``.
        channels: conv widths, one block each (default ``[32, 64, 128]``; 32 px → a 4x4 map of 16 tokens).
        embed_dim: token / pooled width.
    """
    return SmallCNNEncoder(image_size, color, tuple(channels or (32, 64, 128)), embed_dim)
