"""Every registered encoder honours the contract (generic network-only names run through their tiny variants)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import encoders
from encoders import Encoder, ModalityOutput

# generic families that load from a hub: tested through the tiny variant building the same class
NETWORK_ONLY = {
    "hf-text": "tiny-text",
    "timm-image": "tiny-image",
    "hf-audio": "tiny-wav2vec2",
    "torchaudio-bundle": "tiny-torchaudio-wav2vec2",
}
# faster options for offline encoders whose defaults are larger
OPTIONS = {
    "mel-cnn": {"channels": [8, 16], "embed_dim": 16, "num_layers": 1, "num_heads": 2},
    "efficientnet-lite0": {"image_size": 64},
}
# the package's own encoders (test files register fakes too; those are not the package's to check)
NAMES = sorted({NETWORK_ONLY.get(n, n) for n in encoders.list_encoders()
                if encoders._REGISTRY.get(n).__module__.startswith("encoders.")})


def _raw(modality: str) -> list:
    rng = np.random.default_rng(0)
    if modality == "text":
        return ["a small cat sat on the mat", None, "rain"]
    if modality == "image":
        return [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8), None, rng.random((30, 30)).astype(np.float32)]
    t = np.arange(16000 * 0.6) / 16000
    return [(0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), None, rng.normal(0, 0.1, 4000).astype(np.float32)]


def _trainable(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_encoder_contract(name: str) -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder(name, finetune="full", **OPTIONS.get(name, {}))
    assert isinstance(enc, Encoder) and enc.modality in encoders.MODALITIES
    pre = pickle.loads(pickle.dumps(enc.preprocessor))  # picklable, model-free
    assert not any(isinstance(v, torch.nn.Module) for v in vars(pre).values())
    assert pre.to_dict() == enc.preprocessor.to_dict()
    batch = pre(_raw(enc.modality))
    assert batch["present"].tolist() == [True, False, True]

    # shapes, mask, pooled; the absent row has an all-False mask
    enc.eval()
    out = enc(batch)
    assert isinstance(out, ModalityOutput)
    b, t, d = out.tokens.shape
    assert (b, d) == (3, enc.embed_dim) and out.pooled.shape == (3, enc.embed_dim) and t >= 1
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, t)
    assert out.mask[0].any() and out.mask[2].any() and not out.mask[1].any()
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()
    assert out.pooled[0].abs().sum() > 0

    # state_dict round trip gives identical outputs
    clone = encoders.create_encoder(name, finetune="full", **OPTIONS.get(name, {})).eval()
    clone.load_state_dict(enc.state_dict())
    assert torch.allclose(clone(batch).pooled, out.pooled, atol=1e-6)
    assert clone.weights_hash() == enc.weights_hash()

    # full: gradients reach parameters
    enc.train()
    enc.zero_grad()
    pooled = enc(batch).pooled  # a random projection: the squared norm is constant for L2-normalised encoders
    (pooled * torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)

    # frozen: nothing trainable, output carries no graph
    enc.set_finetune("frozen")
    assert not _trainable(enc)
    assert not enc(batch).pooled.requires_grad

    # last_n=1: the last block trains, every earlier block stays frozen
    blocks = enc.trainable_blocks()
    enc.set_finetune("last_n", last_n=1)
    last = _trainable(blocks[-1])
    assert last and _trainable(enc) == last
    for block in blocks[:-1]:
        assert not (_trainable(block) - last)


@pytest.mark.parametrize("name", NAMES)
def test_encoder_gives_the_same_outputs_called_from_threads_at_once(name: str) -> None:
    """The feature cache runs chunks on worker threads side by side: calls may not share state."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    enc = encoders.create_encoder(name, finetune="frozen", **OPTIONS.get(name, {})).eval()
    rng = np.random.default_rng(1)
    batches = [enc.preprocessor(_raw(enc.modality)), enc.preprocessor(_raw(enc.modality)[::-1])]
    if enc.modality == "image":  # a second batch with other pixels
        batches[1] = enc.preprocessor([rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)] * 2)
    with torch.no_grad():
        expected = [enc(b).pooled for b in batches]
    meet = threading.Barrier(2, timeout=30)

    def call(i: int) -> torch.Tensor:
        meet.wait()  # both threads start their call together
        with torch.no_grad():
            return enc(batches[i % 2]).pooled

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(call, range(6)))
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, expected[i % 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-text", "tiny-wav2vec2", "tiny-torchaudio-wav2vec2"])
def test_lora_trains_only_adapters(name: str) -> None:
    torch.manual_seed(0)
    base = encoders.create_encoder(name, finetune="frozen").eval()
    torch.manual_seed(0)  # the same random base weights; LoRA is injected after them
    enc = encoders.create_encoder(name, finetune="lora", lora_r=4)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = enc.preprocessor(_raw(enc.modality))
    enc.eval()
    pooled = enc(batch).pooled
    # LoRA starts as the identity (B = 0): the adapted encoder gives the base encoder's features
    torch.testing.assert_close(pooled, base(batch).pooled, rtol=0, atol=1e-5)
    (pooled * torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    # every B matrix gets a gradient (A's is zero at init, since it flows through B = 0); the base gets none
    b_grads = [g for n, g in grads.items() if "lora_B" in n]
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads)
    assert all(g is None for n, g in grads.items() if n not in trainable)


def test_hf_audio_spectrogram_models(tmp_path) -> None:
    """Whisper (encoder only) and AST from local folders: features come from their own feature extractors."""
    from transformers import ASTConfig, ASTFeatureExtractor, WhisperConfig, WhisperFeatureExtractor

    small = {"encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    WhisperConfig(d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32, **small).save_pretrained(tmp_path / "w")
    WhisperFeatureExtractor().save_pretrained(tmp_path / "w")
    ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_length=128).save_pretrained(tmp_path / "a")
    ASTFeatureExtractor(max_length=128).save_pretrained(tmp_path / "a")
    for folder, frames in (("w", 51), ("a", 146)):  # whisper: 1 s -> 51 of 1500 frames; AST: all patches
        enc = encoders.create_encoder("hf-audio", model_name=str(tmp_path / folder), pretrained=False)
        assert enc.embed_dim == 32
        pre = pickle.loads(pickle.dumps(enc.preprocessor))
        out = enc(pre([np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), None]))
        assert out.mask.sum(1).tolist() == [frames, 0] and torch.isfinite(out.pooled).all()
