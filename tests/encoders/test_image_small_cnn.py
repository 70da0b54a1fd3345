"""``small-cnn``: token grid, brightness/contrast invariance, and it learns what raw pixels cannot separate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import encoders
from fusion_errors import ConfigError


def test_tokens_are_the_final_feature_map() -> None:
    enc = encoders.create_encoder("small-cnn", image_size=32, channels=[8, 16, 32], embed_dim=24).eval()
    out = enc(enc.preprocessor([np.zeros((50, 40, 3), np.uint8), None]))
    assert out.tokens.shape == (2, 16, 24)  # 32 px halved three times: a 4x4 grid
    assert out.mask.tolist() == [[True] * 16, [False] * 16]
    assert torch.allclose(out.pooled[0], out.tokens[0].mean(0))


def test_rgb_input_has_three_channels() -> None:
    enc = encoders.create_encoder("small-cnn", color="rgb", channels=[4])
    assert enc.blocks[0].conv.in_channels == 3 and enc.preprocessor.to_dict() == {"image_size": 32, "color": "rgb"}


def test_brightness_and_contrast_do_not_change_the_output() -> None:
    torch.manual_seed(0)
    img = np.random.default_rng(0).integers(10, 110, (32, 32)).astype(np.uint8)
    enc = encoders.create_encoder("small-cnn", channels=[8, 16]).eval()
    a, b = enc(enc.preprocessor([img, (2 * img.astype(np.int64) + 30).astype(np.uint8)])).pooled
    assert torch.allclose(a, b, atol=1e-4)


def test_too_many_blocks_for_the_size() -> None:
    with pytest.raises(ConfigError, match="image_size=8 is too small"):
        encoders.create_encoder("small-cnn", image_size=8, channels=[4, 4, 4, 4])


def _stripes(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], torch.Tensor]:
    """Horizontal (0) or vertical (1) stripes of period 4 at a random phase, plus noise: every pixel's mean is the
    same in both classes, so no linear function of the pixels separates them."""
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        wave = ((np.arange(16) + rng.integers(4)) % 4 < 2).astype(np.float32)
        img = np.tile(wave[:, None], (1, 16)) if label == 0 else np.tile(wave[None, :], (16, 1))
        images.append(np.clip(img * 0.6 + 0.2 + rng.normal(0, 0.15, img.shape), 0, 1).astype(np.float32))
        labels.append(label)
    return images, torch.tensor(labels)


def test_learns_stripe_orientation_that_a_linear_pixel_model_cannot() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    (train, y), (test, y_test) = _stripes(256, rng), _stripes(128, rng)
    enc = encoders.create_encoder("small-cnn", image_size=16, channels=[8, 16], embed_dim=16, finetune="full")
    head = nn.Linear(16, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-3)
    batch, test_batch = enc.preprocessor(train), enc.preprocessor(test)
    for _ in range(6):
        for idx in torch.randperm(256).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(head(enc({k: v[idx] for k, v in batch.items()}).pooled), y[idx]).backward()
            opt.step()
    enc.eval()
    with torch.no_grad():
        cnn = float((head(enc(test_batch).pooled).argmax(1) == y_test).float().mean())
    from sklearn.linear_model import LogisticRegression

    flat = np.stack([im.reshape(-1) for im in train]), np.stack([im.reshape(-1) for im in test])
    linear = LogisticRegression(max_iter=1000).fit(flat[0], y.numpy()).score(flat[1], y_test.numpy())
    assert cnn >= 0.95 and linear <= 0.75
