"""Building blocks shared by the from-scratch CNN encoders (``small-cnn`` on images, ``mel-cnn`` on log-mels)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvBlock"]


class ConvBlock(nn.Module):
    """Conv3x3 → BatchNorm → GELU → 2x2 max-pool: [B, C_in, H, W] → [B, C_out, ceil(H / 2), ceil(W / 2)].

    H x W is an image, or mel bins x frames. The submodule names (``conv``, ``norm``) are the state-dict keys of
    saved checkpoints: keep them.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))
