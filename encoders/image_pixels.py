"""Raw pixels as image features, alone or beside EfficientNet-Lite0 (small, degraded images; docs/encoders.md).

Registered: ``pixels`` (a weight-free thumbnail: the image resized to ``image_size`` x ``image_size``, grayscale or
RGB, standardised per image) and ``efficientnet-lite0-pixels`` (EfficientNet-Lite0's features with that thumbnail
appended to every token and to the pooled vector). Frozen ImageNet features of small noisy grayscale images carry
little class signal; a thumbnail gives the fusion model what a logistic regression on the raw pixels sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fusion_errors import ConfigError, InputError

from . import register_encoder
from ._contract import Encoder, ModalityOutput, Preprocessor
from ._image_io import DRAFT_MARGIN, ImagePreprocessor, load_image
from .image_timm import TimmImageEncoder, efficientnet_lite0

__all__ = ["PixelPreprocessor", "PixelEncoder", "EfficientNetPixelsPreprocessor", "EfficientNetPixelsEncoder"]

_COLORS = ("gray", "rgb")
_EPS = 1e-2  # floor of the per-image std (on 0..1 pixels): a flat image stays flat instead of blowing up noise


def _check_batch(items: Any) -> None:
    if isinstance(items, (str, bytes, Image.Image, np.ndarray, Tensor, Mapping)):
        raise InputError("image batch must be a list of images; wrap a single image as [image].")
    if not isinstance(items, Sequence):
        raise InputError(f"image batch is a {type(items).__name__}; pass a list of images (None = missing).")


class PixelPreprocessor(Preprocessor):
    """The whole image resized (no crop) to ``image_size`` x ``image_size``, 0..1: area-averaged when shrinking
    (each thumbnail pixel is the mean of the pixels it covers, which also averages noise), bilinear when enlarging.

    Output: ``pixels`` [B, C, S, S] float32 (C = 1 for ``gray``, 3 for ``rgb``; missing items are zeros) and
    ``present`` [B] bool.
    """

    modality = "image"

    def __init__(self, image_size: int = 28, color: str = "gray") -> None:
        if not 4 <= image_size <= 128:
            raise ConfigError(f"image_size={image_size} must be in 4..128 pixels (a thumbnail; D = C * size**2).")
        if color not in _COLORS:
            raise ConfigError(f"color={color!r} must be one of {_COLORS}.")
        self.image_size = int(image_size)
        self.color = color

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def decode_side(self) -> int:
        """The side length JPEGs may be decoded down to (``load_image``'s ``min_side``)."""
        return DRAFT_MARGIN * self.image_size

    def to_tensor(self, img: Image.Image) -> Tensor:
        """One RGB (or ``L``) image → [C, S, S] in 0..1; an ``L`` image resizes as one channel, repeated for RGB."""
        s = self.image_size
        shrink = img.width >= s and img.height >= s
        img = (img.convert("L") if self.color == "gray" else img).resize(
            (s, s), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [S, S] or [S, S, 3]
        return x.expand(self.channels, s, s) if x.dim() == 2 else x.permute(2, 0, 1)  # [C, S, S]

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        _check_batch(items)
        s = self.image_size
        pixels = torch.zeros(len(items), self.channels, s, s)  # [B, C, S, S]
        present = torch.zeros(len(items), dtype=torch.bool)  # [B]
        for i, item in enumerate(items):
            if item is None:
                continue
            pixels[i] = self.to_tensor(load_image(item, f"image item {i}", self.decode_side, keep_gray=True))
            present[i] = True
        return {"pixels": pixels, "present": present}

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "color": self.color}


class _Thumbnail(nn.Module):
    """[B, C, S, S] pixels → [B, C*S*S]: per-image standardisation, then a learned per-pixel affine (identity at
    start, so a frozen thumbnail is exactly the standardised pixels; ``finetune='full'`` may reweight pixels)."""

    def __init__(self, dim: int, standardize: bool) -> None:
        super().__init__()
        self.standardize = standardize
        self.gain = nn.Parameter(torch.ones(dim))  # [D]
        self.bias = nn.Parameter(torch.zeros(dim))  # [D]

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.flatten(1)  # [B, D]
        if self.standardize:  # removes brightness and contrast, which vary per image in degraded data
            x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, unbiased=False).clamp_min(_EPS)
        return x * self.gain + self.bias


class PixelEncoder(Encoder):
    """A thumbnail of the image as its feature vector: tokens [B, 1, D] (the pooled vector), D = C * size**2."""

    modality = "image"

    def __init__(self, image_size: int = 28, color: str = "gray", standardize: bool = True) -> None:
        super().__init__()
        self.preprocessor = PixelPreprocessor(image_size, color)
        self.embed_dim = self.preprocessor.channels * self.preprocessor.image_size**2
        self.thumbnail = _Thumbnail(self.embed_dim, standardize)

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = self.thumbnail.gain.device
        pooled = self.thumbnail(batch["pixels"].to(device))  # [B, D]
        mask = torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=device)  # [B, 1]
        return ModalityOutput(pooled[:, None], mask, pooled)

    def trainable_blocks(self) -> list[nn.Module]:
        return [self.thumbnail]


class EfficientNetPixelsPreprocessor(Preprocessor):
    """Decodes each image once and gives both EfficientNet's ``pixel_values`` and the thumbnail's ``pixels``."""

    modality = "image"

    def __init__(self, network: ImagePreprocessor, thumbnail: PixelPreprocessor) -> None:
        self.network = network
        self.thumbnail = thumbnail

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        _check_batch(items)
        n, s, t = len(items), self.network.image_size, self.thumbnail.image_size
        pixel_values = torch.zeros(n, 3, s, s)  # [B, 3, S, S]
        pixels = torch.zeros(n, self.thumbnail.channels, t, t)  # [B, C, T, T]
        present = torch.zeros(n, dtype=torch.bool)  # [B]
        for i, item in enumerate(items):
            if item is None:
                continue
            img = load_image(item, f"image item {i}", self.decode_side, keep_gray=True)
            self.network.normalize_into(pixel_values[i], self.network.crop(img))
            pixels[i], present[i] = self.thumbnail.to_tensor(img), True
        return {"pixel_values": pixel_values, "pixels": pixels, "present": present}

    @property
    def decode_side(self) -> int:
        """The side length JPEGs may be decoded down to: what the larger of the two resizes needs."""
        return max(self.network.decode_side, self.thumbnail.decode_side)

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network.to_dict(), "thumbnail": self.thumbnail.to_dict()}


class EfficientNetPixelsEncoder(Encoder):
    """EfficientNet-Lite0 tokens [B, 49, 1280] with the thumbnail vector [B, P] appended to each token:
    tokens [B, T, 1280 + P], pooled = [EfficientNet pooled, thumbnail] (the mean of the tokens)."""

    modality = "image"

    def __init__(self, network: TimmImageEncoder, thumbnail: PixelEncoder) -> None:
        super().__init__()
        self.network = network
        self.thumbnail = thumbnail
        self.preprocessor = EfficientNetPixelsPreprocessor(cast(ImagePreprocessor, network.preprocessor),
                                                           cast(PixelPreprocessor, thumbnail.preprocessor))
        self.embed_dim = network.embed_dim + thumbnail.embed_dim

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        net = self.network.encode(batch)  # tokens [B, T, 1280], pooled [B, 1280]
        thumb = self.thumbnail.thumbnail(batch["pixels"].to(net.pooled.device))  # [B, P]
        tokens = torch.cat([net.tokens, thumb[:, None].expand(-1, net.tokens.shape[1], -1)], dim=2)  # [B, T, D]
        return ModalityOutput(tokens, net.mask, torch.cat([net.pooled, thumb], dim=1))

    def trainable_blocks(self) -> list[nn.Module]:
        """EfficientNet's blocks (stem, stages, head), the thumbnail's affine last."""
        return [*self.network.trainable_blocks(), self.thumbnail.thumbnail]


@register_encoder("pixels")
def pixels(image_size: int = 28, color: str = "gray", standardize: bool = True) -> PixelEncoder:
    """The image itself, small: resized to ``image_size`` x ``image_size`` and flattened (no pretrained weights).

    Args:
        image_size: thumbnail side in pixels (4..128); D = C * image_size**2.
        color: ``gray`` (C = 1) or ``rgb`` (C = 3).
        standardize: subtract each image's mean and divide by its std (brightness/contrast invariance).
    """
    return PixelEncoder(image_size, color, standardize)


@register_encoder("efficientnet-lite0-pixels")
def efficientnet_lite0_pixels(
    image_size: int = 64, thumbnail_size: int = 16, color: str = "rgb", standardize: bool = True
) -> EfficientNetPixelsEncoder:
    """EfficientNet-Lite0 (offline weights) beside a pixel thumbnail: D = 1280 + C * thumbnail_size**2.

    The defaults are fitted to small images (up to ~64 px: digits, icons, easy-VQA): measured in docs/encoders.md,
    EfficientNet at 64 px beats 224 px on degraded digits and costs 1/20 of the time; an RGB 16-px thumbnail
    (768 values) matches a gray 28-px one on gray digits and keeps colour. Pass ``image_size=224`` for photos
    larger than ~100 px.

    Args:
        image_size: EfficientNet's input side (64; 224 is its training resolution).
        thumbnail_size, color, standardize: the thumbnail's options (see ``pixels``; here 16 px RGB).
    """
    return EfficientNetPixelsEncoder(efficientnet_lite0(image_size), PixelEncoder(thumbnail_size, color, standardize))
