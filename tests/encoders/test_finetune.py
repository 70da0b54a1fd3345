"""Fine-tuning policies train what they say: last_n counts transformer layers (never the unused pooler), encoders
trained from scratch default to trainable, and ``atomic_write`` never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import encoders
from encoders._weights import minilm_l6_path
from encoders.text_hf import HFTextEncoder, TextPreprocessor
from fusion_common.atomic import atomic_write
from zoo.config import EncoderSpec

TEXTS = ["a small cat sat on the mat", "rain again", None]


def _tiny_bert_with_pooler() -> HFTextEncoder:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    return HFTextEncoder(BertModel(config, add_pooling_layer=True), TextPreprocessor(str(minilm_l6_path()), 32))


def _trainable(enc: torch.nn.Module) -> list[str]:
    return [n for n, p in enc.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("last_n, layers", [(1, {"2"}), (2, {"1", "2"})])
def test_last_n_counts_transformer_layers_not_the_pooler(last_n: int, layers: set[str]) -> None:
    enc = _tiny_bert_with_pooler().set_finetune("last_n", last_n=last_n)
    names = _trainable(enc)
    assert names and not any(".pooler." in n for n in names)
    assert {n.split(".")[3] for n in names} == layers and all(n.startswith("model.encoder.layer.") for n in names)
    enc.train()
    pooled = enc(enc.preprocessor(TEXTS)).pooled
    (pooled * torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    # everything that trains gets a gradient: nothing trainable is silently unused
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters() if p.requires_grad)


def test_full_finetune_leaves_the_unused_pooler_frozen() -> None:
    enc = _tiny_bert_with_pooler().set_finetune("full")
    names = _trainable(enc)
    assert not any(".pooler." in n for n in names) and any(n.startswith("model.embeddings.") for n in names)


@pytest.mark.slow
def test_minilm_last_n_1_trains_its_last_layer() -> None:
    enc = encoders.create_encoder("minilm-l6", finetune="last_n", last_n=1)
    names = _trainable(enc)
    assert len(names) == 16  # BERT layer: q, k, v, attn out, attn norm, intermediate, out, out norm (w + b each)
    assert all(n.startswith("model.encoder.layer.5.") for n in names)


def test_mel_cnn_trains_by_default_pretrained_encoders_stay_frozen() -> None:
    enc = encoders.create_encoder("mel-cnn", channels=[8, 16], embed_dim=16)
    assert enc.finetune == "full" and enc.pretrained is False
    assert all(p.requires_grad for p in enc.parameters())
    assert EncoderSpec.parse("mel-cnn").finetune == "full"
    assert EncoderSpec.parse("minilm-l6").finetune == "frozen"
    assert EncoderSpec.parse({"name": "mel-cnn", "finetune": "frozen"}).finetune == "frozen"  # explicit wins
    assert encoders.default_finetune("no-such-encoder") == "frozen"


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temp file left
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_text() == "new"
