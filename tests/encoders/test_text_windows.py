"""Long texts are read in windows of ``max_length`` tokens (up to ``max_windows``), not cut after the first."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import encoders
from fusion_errors import ConfigError

LONG = " ".join(f"item {i} of the list." for i in range(120))  # ~720 tokens: many 16-token windows
SHORT = "a short text"


def _enc(**options: object) -> encoders.Encoder:
    torch.manual_seed(0)
    return encoders.create_encoder("tiny-text", max_length=16, **options).eval()


def test_long_texts_become_windows_side_by_side_up_to_max_windows() -> None:
    enc = _enc(max_windows=5)
    tok = enc.preprocessor.tokenizer
    batch = enc.preprocessor([SHORT, LONG, None])
    ids, mask = batch["input_ids"].reshape(3, 5, 16), batch["attention_mask"].reshape(3, 5, 16)
    assert batch["input_ids"].shape == (3, 80) and batch["present"].tolist() == [True, True, False]
    assert mask.sum(-1).tolist() == [[5, 0, 0, 0, 0], [16] * 5, [2, 0, 0, 0, 0]]  # [CLS] a short text [SEP]
    assert (ids[1, :, 0] == tok.cls_token_id).all() and (ids[1, :, 15] == tok.sep_token_id).all()
    content = ids[1, :, 1:15]  # [W, 14] each window's text tokens
    assert torch.equal(content[1, :4], content[0, -4:])  # 4 tokens (16 // 4) shared with the window before
    whole = tok(LONG, add_special_tokens=False)["input_ids"]
    read = content[0].tolist() + [t for w in content[1:] for t in w[4:].tolist()]
    assert read == whole[: len(read)] and len(read) == 14 + 4 * 10  # the text's start, in order, nothing skipped


def test_batches_of_short_texts_are_unchanged() -> None:
    windowed, truncated = _enc(), _enc(max_windows=1)
    a, b = windowed.preprocessor([SHORT, "another one"]), truncated.preprocessor([SHORT, "another one"])
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "present"))
    assert a["input_ids"].shape == (2, 5)  # padded to the longest text, not to max_length


def test_words_past_the_first_window_reach_the_features() -> None:
    same_start = [LONG[:150] + " The answer is blue.", LONG[:150] + " The answer is red."]  # ~50 tokens each
    windowed, truncated = _enc(), _enc(max_windows=1)
    with torch.inference_mode():
        w = windowed(windowed.preprocessor(same_start)).pooled
        t = truncated(truncated.preprocessor(same_start)).pooled
    assert torch.equal(t[0], t[1])  # cut after 14 words: both texts look the same
    assert (w[0] - w[1]).abs().max() > 1e-3  # read in windows: the endings differ


def test_mean_pooling_averages_every_token_of_every_window() -> None:
    enc = _enc(max_windows=3)
    batch = enc.preprocessor([SHORT, LONG])
    with torch.inference_mode():
        out = enc(batch)
        alone = enc(enc.preprocessor([SHORT])).pooled[0]
        windows = batch["input_ids"][1].reshape(3, 16)
        states = enc.model(input_ids=windows, attention_mask=torch.ones_like(windows)).last_hidden_state  # [3,16,D]
    assert out.tokens.shape == (2, 48, enc.embed_dim) and out.mask[1].all() and out.mask[0].sum() == 5
    torch.testing.assert_close(out.pooled[1], states.reshape(48, -1).mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooled[0], alone, rtol=0, atol=1e-5)  # a short text beside a long one


def test_cls_pooling_averages_the_windows_first_tokens() -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-text", max_length=16, max_windows=2)
    enc.pooling = "cls"
    enc.eval()
    batch = enc.preprocessor([LONG, SHORT])
    with torch.inference_mode():
        pooled = enc(batch).pooled
        windows = batch["input_ids"][0].reshape(2, 16)
        first = enc.model(input_ids=windows, attention_mask=torch.ones_like(windows)).last_hidden_state[:, 0]
        short = enc.model(input_ids=batch["input_ids"][1, :5][None]).last_hidden_state[0, 0]
    torch.testing.assert_close(pooled[0], first.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled[1], short, rtol=0, atol=1e-5)  # its one window: no empty window averaged in


def test_a_huge_text_is_bounded_by_max_windows() -> None:
    enc = _enc(max_windows=4)
    batch = enc.preprocessor(["word " * 200_000])  # 1 M characters
    assert batch["input_ids"].shape == (1, 64) and batch["attention_mask"].all()


@pytest.mark.parametrize("bad", [0, 65])
def test_max_windows_out_of_range_names_the_fix(bad: int) -> None:
    with pytest.raises(ConfigError, match=r"max_windows=.* must be in 1\.\.64"):
        encoders.create_encoder("tiny-text", max_windows=bad)


def test_a_slow_tokenizer_truncates_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _enc(max_windows=4)
    monkeypatch.setattr(type(enc.preprocessor.tokenizer), "is_fast", property(lambda self: False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert enc.preprocessor([SHORT])["input_ids"].shape == (1, 5)  # nothing cut: nothing said
    with pytest.warns(UserWarning, match=r"truncated, not read in windows.*max_windows=1 to truncate on purpose"):
        batch = enc.preprocessor([LONG, SHORT])
    assert batch["input_ids"].shape == (2, 16)  # one window each: truncated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.preprocessor([LONG])  # said once per preprocessor


def test_an_export_sidecar_records_one_window_per_text(tmp_path) -> None:
    from zoo.config import FusionModelConfig
    from zoo.export import export, sidecar_path
    from zoo.model import FusionModel

    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"text": {"name": "tiny-text", "options": {"max_length": 16}}},
                            labels=("a", "b"), hidden_dim=8)
    model = FusionModel(cfg).eval()
    assert model.encoders["text"].preprocessor.max_windows == 8
    out = export(model, tmp_path / "m.pt", format="torchscript", example={"text": ["one text", "another text"]})
    side = json.loads(sidecar_path(out).read_text())
    assert side["preprocessing"]["text"]["max_windows"] == 1 and side["preprocessing"]["text"]["max_length"] == 16
