"""``pixels`` and ``efficientnet-lite0-pixels``: exact thumbnails, invariances, and the composite's two parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
from fusion_errors import ConfigError, InputError


def _halves(low: int, high: int, size: int = 8) -> np.ndarray:
    """A grey image whose left half is ``low`` and right half ``high``."""
    img = np.full((size, size), low, np.uint8)
    img[:, size // 2:] = high
    return img


def test_standardised_halves_are_minus_and_plus_one() -> None:
    # mean (low + high) / 2 and std (high - low) / 2 per image: every pixel becomes exactly -1 or +1
    enc = encoders.create_encoder("pixels", image_size=8)
    out = enc(enc.preprocessor([_halves(40, 200)]))
    expected = torch.tensor([-1.0] * 4 + [1.0] * 4).repeat(8)
    assert out.pooled.shape == (1, 64) and out.tokens.shape == (1, 1, 64)
    assert torch.allclose(out.pooled[0], expected, atol=1e-6)


def test_brightness_and_contrast_do_not_change_standardised_pixels() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(10, 110, (28, 28)).astype(np.uint8)
    brighter = (2 * img.astype(np.int64) + 30).astype(np.uint8)  # contrast x2, brightness +30, still <= 250
    enc = encoders.create_encoder("pixels")
    a, b = enc(enc.preprocessor([img, brighter])).pooled
    assert torch.allclose(a, b, atol=1e-4)
    raw = encoders.create_encoder("pixels", standardize=False)
    ra, rb = raw(raw.preprocessor([img, brighter])).pooled
    assert torch.allclose(rb, 2 * ra + 30 / 255, atol=1e-5)  # unstandardised: the plain 0..1 pixels


def test_flat_image_stays_finite_and_zero() -> None:
    enc = encoders.create_encoder("pixels", image_size=16)
    out = enc(enc.preprocessor([np.full((20, 20), 123, np.uint8)]))
    assert torch.equal(out.pooled, torch.zeros(1, 256))


def test_gray_uses_luma_and_rgb_keeps_channels() -> None:
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    gray = encoders.create_encoder("pixels", image_size=10, standardize=False)
    assert torch.allclose(gray(gray.preprocessor([red])).pooled, torch.full((1, 100), 76 / 255))  # ITU-R 601: 0.299*255
    rgb = encoders.create_encoder("pixels", image_size=10, color="rgb", standardize=False)
    assert rgb.embed_dim == 300
    x = rgb(rgb.preprocessor([red])).pooled.view(3, 10, 10)
    assert torch.equal(x[0], torch.ones(10, 10)) and torch.equal(x[1:], torch.zeros(2, 10, 10))


def test_whole_image_is_resized_without_crop() -> None:
    # a 4-px bright border becomes exactly the first column of a 4x area downscale (a centre crop, as
    # ImagePreprocessor does, would drop it; a bilinear filter would blur it into its neighbours)
    img = np.zeros((32, 32), np.uint8)
    img[:, :4] = 255
    enc = encoders.create_encoder("pixels", image_size=8, standardize=False)
    x = enc(enc.preprocessor([img])).pooled.view(8, 8)
    assert torch.equal(x[:, 0], torch.ones(8)) and torch.equal(x[:, 1:], torch.zeros(8, 7))


def test_gain_is_trainable_under_full_and_changes_the_output() -> None:
    enc = encoders.create_encoder("pixels", image_size=8, finetune="full")
    batch = enc.preprocessor([_halves(0, 255)])
    with torch.no_grad():
        enc.thumbnail.gain[:4] = 0.0  # zero the first row's left half
    out = enc(batch).pooled[0]
    assert torch.equal(out[:4], torch.zeros(4)) and torch.allclose(out[4:8], torch.ones(4))


@pytest.mark.parametrize(("options", "error"), [({"image_size": 2}, ConfigError), ({"image_size": 300}, ConfigError),
                                                ({"color": "cmyk"}, ConfigError)])
def test_bad_options(options: dict, error: type) -> None:
    with pytest.raises(error, match="image_size|color"):
        encoders.create_encoder("pixels", **options)


def test_single_image_not_in_a_list_is_an_input_error() -> None:
    enc = encoders.create_encoder("pixels")
    with pytest.raises(InputError, match="wrap a single image"):
        enc.preprocessor(Image.new("L", (8, 8)))


@pytest.mark.slow
def test_composite_is_efficientnet_beside_the_thumbnail() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), None, rng.integers(0, 255, (28, 28), dtype=np.uint8)]
    both = encoders.create_encoder("efficientnet-lite0-pixels", image_size=64, thumbnail_size=12, color="gray")
    net = encoders.create_encoder("efficientnet-lite0", image_size=64)
    thumb = encoders.create_encoder("pixels", image_size=12)
    assert both.embed_dim == 1280 + 144
    batch = both.preprocessor(images)
    assert torch.equal(batch["pixel_values"], net.preprocessor(images)["pixel_values"])  # same preprocessing, exactly
    assert torch.equal(batch["pixels"], thumb.preprocessor(images)["pixels"])
    assert batch["present"].tolist() == [True, False, True]
    out = both(batch)
    ref_net, ref_thumb = net(net.preprocessor(images)), thumb(thumb.preprocessor(images))
    assert torch.allclose(out.pooled[:, :1280], ref_net.pooled, atol=1e-5)
    assert torch.allclose(out.pooled[:, 1280:], ref_thumb.pooled, atol=1e-6)
    assert torch.allclose(out.tokens[:, :, :1280], ref_net.tokens, atol=1e-5)
    assert torch.allclose(out.tokens[0, :, 1280:], ref_thumb.pooled[0].expand(out.tokens.shape[1], -1))
    assert out.mask.sum(1).tolist() == [4, 0, 4]  # a 2x2 feature map at 64 px; the missing row is masked
    assert torch.allclose(out.tokens[2].mean(0), out.pooled[2], atol=1e-5)  # pooled is the mean of the tokens
    default = encoders.create_encoder("efficientnet-lite0-pixels")  # fitted to small images: 64 px, 16 px RGB thumb
    assert default.embed_dim == 1280 + 3 * 16 * 16 and default.preprocessor.to_dict()["network"]["image_size"] == 64
