"""Small fake encoders (one per modality, random but seeded weights) and tiny fused models for zoo tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from encoders import Encoder, ModalityOutput, Preprocessor, register_encoder
from encoders._audio_io import load_audio
from encoders._image_io import load_image
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

LABELS = ("a", "b", "c")
FAKE = {"audio": "zoo-fake-audio", "image": "zoo-fake-image", "text": "zoo-fake-text"}


class TextPre(Preprocessor):
    modality = "text"

    def __init__(self, max_len: int = 8) -> None:
        self.max_len = max_len

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        ids = torch.zeros(len(items), self.max_len, dtype=torch.long)
        for i, s in enumerate(items):
            codes = [1 + ord(c) % 50 for c in (s or "")[: self.max_len]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ids > 0,
                "present": torch.tensor([s is not None for s in items])}

    def to_dict(self) -> dict[str, Any]:
        return {"max_len": self.max_len}


class ImagePre(Preprocessor):
    modality = "image"

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        px = torch.zeros(len(items), 3, 8, 8)
        for i, img in enumerate(items):
            if img is not None:
                arr = np.asarray(load_image(img).resize((8, 8)), dtype=np.float32) / 255.0  # [8, 8, 3]
                px[i] = torch.from_numpy(arr).permute(2, 0, 1)
        return {"pixel_values": px, "present": torch.tensor([x is not None for x in items])}

    def to_dict(self) -> dict[str, Any]:
        return {"size": 8}


class AudioPre(Preprocessor):
    modality = "audio"

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        wav = torch.zeros(len(items), 64)
        for i, x in enumerate(items):
            if x is not None:
                arr = load_audio(x, 16000)[0].numpy()[:64]  # paths, arrays and (waveform, rate), like a real one
                wav[i, : len(arr)] = torch.from_numpy(arr)
        return {"waveform": wav, "present": torch.tensor([x is not None for x in items])}

    def to_dict(self) -> dict[str, Any]:
        return {"samples": 64}


class FakeEncoder(Encoder):
    """A seeded random encoder: ``seed`` changes the weights (and so the weights hash)."""

    def __init__(self, modality: str, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        self.modality = modality  # type: ignore[misc]
        self.embed_dim = dim
        g = torch.Generator().manual_seed(seed)
        if modality == "text":
            self.preprocessor = TextPre()
            self.embed = nn.Embedding(51, dim)
            self.proj = nn.Linear(dim, dim)
        elif modality == "image":
            self.preprocessor = ImagePre()
            self.conv = nn.Conv2d(3, dim, 3, padding=1)
            self.proj = nn.Linear(dim, dim)
        else:
            self.preprocessor = AudioPre()
            self.frame = nn.Linear(16, dim)
            self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def lora_target_modules(self) -> list[str]:
        return ["proj"]

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        if self.modality == "text":
            tokens = self.proj(self.embed(batch["input_ids"]))  # [B, T, D]
            mask = batch["attention_mask"].bool()
        elif self.modality == "image":
            x = self.conv(batch["pixel_values"])  # [B, D, 8, 8]
            tokens = self.proj(x.flatten(2).transpose(1, 2))  # [B, 64, D]
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        else:
            frames = batch["waveform"].reshape(batch["waveform"].shape[0], 4, 16)  # [B, 4, 16]
            tokens = self.proj(torch.tanh(self.frame(frames)))  # [B, 4, D]
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        w = mask.float()[..., None]
        pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)


for _m, _name in FAKE.items():
    register_encoder(_name)(lambda dim=6, seed=0, _m=_m: FakeEncoder(_m, dim, seed))


@pytest.fixture
def make_model() -> Callable[..., FusionModel]:
    """Build a tiny fused model over fake encoders: ``make_model(stage=..., fusion_head=..., finetune=...)``."""

    def make(modalities: Sequence[str] = ("audio", "image", "text"), finetune: str | dict[str, str] = "frozen",
             **kw: Any) -> FusionModel:
        torch.manual_seed(0)
        pol = finetune if isinstance(finetune, dict) else dict.fromkeys(modalities, finetune)
        encs = {m: {"name": FAKE[m], "finetune": pol.get(m, "frozen")} for m in modalities}
        kw.setdefault("hidden_dim", 8)
        cfg = FusionModelConfig(encoders=encs, labels=LABELS, **kw)
        return FusionModel(cfg).eval()

    return make


@pytest.fixture
def randomise_norms() -> Callable[[nn.Module], None]:
    """Gives every BatchNorm2d of a module non-trivial statistics and affine weights (seeded), so a wrong fold shows."""

    def randomise(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.data.copy_(torch.randn(n, generator=gen) * 0.5 + 1.0)
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)

    return randomise


XOR_DIM, XOR_TOKENS = 8, 3  # feature width and tokens per modality of ``xor_features``


@pytest.fixture
def xor_features() -> Callable[..., tuple[dict[str, ModalityOutput], Tensor]]:
    """Toy features whose label needs two modalities: ``xor_features(n, seed, noise=False)``.

    ``image`` and ``text`` each carry one random bit as a noisy direction in their tokens ([N, 3, 8]); the label
    is their XOR, so each alone is at chance. With ``noise``, ``audio`` is added: pure noise, no label information.
    """

    def make(n: int, seed: int, noise: bool = False) -> tuple[dict[str, ModalityOutput], Tensor]:
        g = torch.Generator().manual_seed(seed)
        bits = torch.randint(0, 2, (n, 2), generator=g)
        feats = {}
        for i, m in enumerate(("image", "text")):
            direction = torch.zeros(XOR_DIM)
            direction[i] = 3.0
            signal = (bits[:, i].float() * 2 - 1)[:, None] * direction  # [N, D]
            tokens = signal[:, None, :] + 0.3 * torch.randn(n, XOR_TOKENS, XOR_DIM, generator=g)  # [N, T, D]
            feats[m] = ModalityOutput(tokens, torch.ones(n, XOR_TOKENS, dtype=torch.bool), tokens.mean(1))
        if noise:
            noisy = 3.0 * torch.randn(n, XOR_TOKENS, XOR_DIM, generator=g)  # [N, T, D]
            feats["audio"] = ModalityOutput(noisy, torch.ones(n, XOR_TOKENS, dtype=torch.bool), noisy.mean(1))
        return feats, bits[:, 0] ^ bits[:, 1]

    return make


@pytest.fixture
def train_on_features() -> Callable[..., FusionModel]:
    """Head-side training on fixed features: ``train_on_features(model, feats, labels, done)``.

    Adam (lr 3e-3) on random batches of 64 for up to 400 steps; every 50 steps ``done(step)`` may stop it early.
    Returns the model in eval mode.
    """

    def train(model: FusionModel, feats: dict[str, ModalityOutput], labels: Tensor,
              done: Callable[[int], bool], steps: int = 400) -> FusionModel:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(steps):
            model.train()
            idx = torch.randint(0, len(labels), (64,))
            out = model({m: f.index(idx) for m, f in feats.items()})
            loss = torch.nn.functional.cross_entropy(out.logits, labels[idx]) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 49 and done(step):
                break
        return model.eval()

    return train
