"""Whisper reads a clip longer than its 30 s window as consecutive windows instead of cropping it at 30 s."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import encoders
from fusion_errors import ConfigError

RATE = 16000
WINDOW = 30 * RATE  # Whisper's positions: 1500 encoder frames


def _clip(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, round(seconds * RATE)).astype(np.float32)


def test_a_long_clip_is_read_in_windows_each_encoded_as_a_clip_of_its_own() -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper", max_seconds=75.0).eval()
    long, short = _clip(70, 0), _clip(3, 1)
    with torch.no_grad():
        both = enc(enc.preprocessor([long, short]))
        # expected values from the one-window path: each 30 s segment alone, then the short clip alone
        parts = [enc(enc.preprocessor([long[i:i + WINDOW]])) for i in range(0, len(long), WINDOW)]
        alone = enc(enc.preprocessor([short]))
    assert both.tokens.shape == (2, 3 * 1500, 32)
    assert [p.mask.sum().item() for p in parts] == [1500, 1500, 500]  # 50 frames per second
    assert both.mask.sum(1).tolist() == [3500, 150]
    for k, part in enumerate(parts):
        n = int(part.mask.sum())
        block = both.tokens[0, k * 1500:(k + 1) * 1500]
        torch.testing.assert_close(block[:n], part.tokens[0, :n], atol=1e-5, rtol=0)
        assert bool(both.mask[0, k * 1500:k * 1500 + n].all())
        assert not bool(both.mask[0, k * 1500 + n:(k + 1) * 1500].any())
    frames = torch.cat([p.tokens[0, :int(p.mask.sum())] for p in parts])  # every frame of every window
    torch.testing.assert_close(both.pooled[0], frames.mean(0), atol=1e-5, rtol=0)
    # a clip that fits one window gives what it gives alone, beside a long one
    torch.testing.assert_close(both.tokens[1, :150], alone.tokens[0, :150], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)


def test_what_is_said_after_30_s_changes_the_features_unless_cropped() -> None:
    torch.manual_seed(0)
    head = _clip(30, 2)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(20 * RATE) / RATE)).astype(np.float32)
    a, b = np.concatenate([head, _clip(20, 3)]), np.concatenate([head, tone])  # same first 30 s, then noise / tone
    windowed = encoders.create_encoder("tiny-whisper", max_seconds=60.0).eval()
    cropped = encoders.create_encoder("tiny-whisper", max_seconds=30.0).eval()
    cropped.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        w = windowed(windowed.preprocessor([a, b])).pooled
        c = cropped(cropped.preprocessor([a, b])).pooled
    assert (w[0] - w[1]).abs().max() > 1e-3
    torch.testing.assert_close(c[0], c[1], atol=1e-6, rtol=0)


def test_gradients_reach_the_waveform_past_the_first_window() -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper", max_seconds=40.0, finetune="full").eval()
    batch = enc.preprocessor([_clip(40, 5)])
    batch["waveform"].requires_grad_(True)
    enc(batch).pooled.square().sum().backward()
    grad = batch["waveform"].grad
    assert grad is not None and grad[0, WINDOW:].abs().sum() > 0


def test_absent_rows_and_silent_windows_stay_masked() -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper", max_seconds=40.0).eval()
    with torch.no_grad():
        out = enc(enc.preprocessor([_clip(35, 6), None]))
    assert out.mask.sum(1).tolist() == [1500 + 250, 0]
    assert out.tokens[1].abs().sum() == 0 and out.pooled[1].abs().sum() == 0


def test_max_seconds_is_bounded_and_the_error_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"max_seconds=481.*16 windows of 30 s.*split longer recordings"):
        encoders.create_encoder("tiny-whisper", max_seconds=481.0)
    assert encoders.create_encoder("tiny-whisper", max_seconds=480.0).preprocessor.max_seconds == 480.0


def test_an_export_sidecar_records_one_window_of_audio(tmp_path) -> None:
    from zoo.config import FusionModelConfig
    from zoo.export import export, sidecar_path
    from zoo.model import FusionModel

    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"audio": {"name": "tiny-whisper", "options": {"max_seconds": 75.0}}},
                            labels=("a", "b"), hidden_dim=8)
    model = FusionModel(cfg).eval()
    out = export(model, tmp_path / "m.pt", format="torchscript", example={"audio": [_clip(1, 7), _clip(2, 8)]})
    side = json.loads(sidecar_path(out).read_text())
    assert side["preprocessing"]["audio"]["max_seconds"] == 30.0


def test_a_clip_cut_at_max_seconds_is_said_once() -> None:
    import warnings

    from encoders._audio_io import AudioPreprocessor

    pre = AudioPreprocessor(sample_rate=RATE, max_seconds=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clips shorter than max_seconds: silent
        pre([_clip(1.5, 9), _clip(0.5, 10)])
    with pytest.warns(UserWarning, match=r"max_seconds=2 and are cut there.*raise the audio encoder's max_seconds"):
        batch = pre([_clip(3.0, 11)])
    assert batch["waveform"].shape == (1, 2 * RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre([_clip(5.0, 12)])  # said once per preprocessor


# wav2vec2-style encoders (transformers and torchaudio): the same windows, here 2 s ones to keep the test small
WAV2VEC2 = ["tiny-wav2vec2", "tiny-torchaudio-wav2vec2"]


@pytest.mark.parametrize("name", WAV2VEC2)
def test_wav2vec2_encoders_read_long_clips_in_windows_each_a_clip_of_its_own(name: str) -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder(name, max_seconds=7.0, window_seconds=2.0).eval()
    span = 2 * RATE
    long, short = _clip(5.5, 20), _clip(1.0, 21)
    with torch.no_grad():
        both = enc(enc.preprocessor([long, short, None]))
        # expected values from the one-window path: each 2 s segment alone (the last one 1.5 s), the short clip alone
        parts = [enc(enc.preprocessor([long[i:i + span]])) for i in range(0, len(long), span)]
        alone = enc(enc.preprocessor([short]))
    t = parts[0].tokens.shape[1]  # one full window: (32000 - 400) // 320 + 1 = 99 frames (20 ms hop, 25 ms field)
    assert t == 99 and both.tokens.shape == (3, 3 * t, 32)
    counts = [int(p.mask.sum()) for p in parts]
    assert counts[:2] == [t, t] and counts[2] < t
    assert both.mask.sum(1).tolist() == [sum(counts), int(alone.mask.sum()), 0]
    for k, (part, n) in enumerate(zip(parts, counts, strict=True)):
        torch.testing.assert_close(both.tokens[0, k * t:k * t + n], part.tokens[0, :n], atol=1e-5, rtol=0)
        assert not bool(both.mask[0, k * t + n:(k + 1) * t].any())
    frames = torch.cat([p.tokens[0, :n] for p, n in zip(parts, counts, strict=True)])
    torch.testing.assert_close(both.pooled[0], frames.mean(0), atol=1e-5, rtol=0)
    n = int(alone.mask.sum())
    torch.testing.assert_close(both.tokens[1, :n], alone.tokens[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)
    assert both.pooled[2].abs().sum() == 0


@pytest.mark.parametrize("name", WAV2VEC2)
def test_a_last_window_of_a_few_samples_runs_at_the_shortest_clip_length(name: str) -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder(name, max_seconds=3.0, window_seconds=2.0).eval()
    clip = _clip(2.0 + 50 / RATE, 27)  # 50 samples past the window: fewer than wav2vec2's 400-sample receptive field
    with torch.no_grad():
        out = enc(enc.preprocessor([clip]))
        tail = enc(enc.preprocessor([clip[2 * RATE:]]))  # the preprocessor pads it to min_seconds (0.1 s)
    assert out.mask.sum().item() == 99 + 1  # a present clip keeps at least one frame
    torch.testing.assert_close(out.tokens[0, 99], tail.tokens[0, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", WAV2VEC2)
def test_wav2vec2_audio_past_the_first_window_changes_the_features(name: str) -> None:
    torch.manual_seed(0)
    head = _clip(2.0, 22)
    a, b = np.concatenate([head, _clip(1.5, 23)]), np.concatenate([head, _clip(1.5, 24)])
    enc = encoders.create_encoder(name, max_seconds=4.0, window_seconds=2.0).eval()
    with torch.no_grad():
        out = enc(enc.preprocessor([a, b]))
    assert (out.pooled[0] - out.pooled[1]).abs().max() > 1e-4
    torch.testing.assert_close(out.tokens[0, :99], out.tokens[1, :99], atol=1e-6, rtol=0)  # same first window


@pytest.mark.parametrize("name", WAV2VEC2)
def test_wav2vec2_windows_bound_max_seconds_and_the_sidecar_reads_one_window(name: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"max_seconds=33 is more than 16 windows of 2 s.*split longer"):
        encoders.create_encoder(name, max_seconds=33.0, window_seconds=2.0)
    with pytest.raises(ConfigError, match=r"window_seconds=0.5 must be in \[1, 120\]"):
        encoders.create_encoder(name, window_seconds=0.5)
    from zoo.config import FusionModelConfig
    from zoo.export import export, sidecar_path
    from zoo.model import FusionModel

    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"audio": {"name": name, "options": {"max_seconds": 6.0,
                                                                           "window_seconds": 2.0}}},
                            labels=("a", "b"), hidden_dim=8)
    out = export(FusionModel(cfg).eval(), tmp_path / "m.pt", format="torchscript",
                 example={"audio": [_clip(1, 25), _clip(1.5, 26)]})
    assert json.loads(sidecar_path(out).read_text())["preprocessing"]["audio"]["max_seconds"] == 2.0


def test_no_audio_encoder_reads_more_than_ten_minutes() -> None:
    from encoders._audio_io import AudioPreprocessor

    with pytest.raises(ConfigError, match=r"max_seconds=601 is above the 600 s.*split longer recordings"):
        AudioPreprocessor(max_seconds=601.0)
    with pytest.raises(ConfigError, match=r"max_seconds=700 is above the 600 s"):
        encoders.create_encoder("mel-cnn", max_seconds=700.0)


def test_spectrogram_models_keep_their_own_window_and_only_the_600_s_bound() -> None:
    """hf-audio with a feature extractor (AST, Whisper): no 20 s windows, so no 16-window bound either; the
    extractor is loaded lazily, so a tiny model stands in offline."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from encoders.audio_hf import HFAudioEncoder, HFAudioPreprocessor

    model = Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, conv_dim=(32,) * 7))
    spectrogram = HFAudioEncoder(model, HFAudioPreprocessor("some/extractor", max_seconds=400.0))
    assert spectrogram.window_seconds is None and spectrogram.window_samples == 0
    with pytest.raises(ConfigError, match=r"max_seconds=400 is more than 16 windows of 20 s"):
        HFAudioEncoder(model, HFAudioPreprocessor(None, max_seconds=400.0))
    assert HFAudioEncoder(model, HFAudioPreprocessor(None, max_seconds=40.0)).window_seconds == 20.0


def _mel_cnn_with_layers(**kw):
    torch.manual_seed(0)
    return encoders.create_encoder("mel-cnn", channels=[8, 16], embed_dim=16, num_layers=2, num_heads=2,
                                   max_seconds=8.0, **kw).eval()


def _tokens_before_layers(enc, batch) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = enc.proj.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            enc(batch)
    finally:
        hook.remove()
    return seen[0]  # [B, T, D]: what the transformer layers read


def test_mel_cnn_layers_attend_within_windows_so_long_clips_stay_linear() -> None:
    enc = _mel_cnn_with_layers(attention_seconds=1.0)  # 100 frames/s halved twice: windows of 25 tokens
    assert enc.attention_tokens == 25
    lengths: list[int] = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, args: lengths.append(int(args[0].shape[1])))
             for layer in enc.layers]
    try:
        with torch.no_grad():
            out = enc(enc.preprocessor([_clip(3.5, 1)]))
    finally:
        for h in hooks:
            h.remove()
    assert out.tokens.shape[1] == 88 and lengths and max(lengths) == 25  # 88 tokens, never more than 25 at once
    # each window is the layers applied to its own tokens alone (torch's layers, run by hand here)
    before = _tokens_before_layers(enc, enc.preprocessor([_clip(3.5, 1)]))
    with torch.no_grad():
        for start in (0, 25, 75):
            x = before[:, start:start + 25]
            for layer in enc.layers:
                x = layer(x)
            torch.testing.assert_close(out.tokens[:, start:start + x.shape[1]], x, rtol=0, atol=1e-5)


def test_mel_cnn_windows_start_at_each_clip_so_batch_padding_does_not_move_them() -> None:
    enc = _mel_cnn_with_layers(attention_seconds=1.0)  # windows of 25 tokens
    gen = torch.Generator().manual_seed(0)
    short, long_ = torch.randn(1, 58, 16, generator=gen), torch.randn(1, 140, 16, generator=gen)
    batch = torch.cat([long_, torch.cat([short, torch.zeros(1, 82, 16)], 1)])  # [2, 140, 16], the short one padded
    ignore = torch.zeros(2, 140, dtype=torch.bool)
    ignore[1, 58:] = True
    with torch.no_grad():
        alone = enc._attend(short, torch.zeros(1, 58, dtype=torch.bool))
        together = enc._attend(batch, ignore)
    torch.testing.assert_close(together[1, :58], alone[0], rtol=0, atol=1e-5)
    assert torch.isfinite(together).all()  # windows of padding only (the short clip's 4th-6th) give no NaN


def test_mel_cnn_clips_within_one_window_attend_over_all_their_tokens() -> None:
    enc = _mel_cnn_with_layers()  # 30 s windows: a 2.3 s clip attends over all of its tokens, as before windows
    batch = enc.preprocessor([_clip(2.3, 2)])
    before = _tokens_before_layers(enc, batch)
    with torch.no_grad():
        out = enc(batch)
        x = before
        for layer in enc.layers:
            x = layer(x)
    torch.testing.assert_close(out.tokens, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.5, 121.0])
def test_mel_cnn_attention_window_is_bounded(seconds: float) -> None:
    with pytest.raises(ConfigError, match=r"attention_seconds=.* must be in \[1, 120\] seconds"):
        encoders.create_encoder("mel-cnn", attention_seconds=seconds)


@pytest.mark.parametrize(("layers", "read"), [(1, 2.0), (0, 6.0)])
def test_an_exported_mel_cnn_reads_one_attention_window(tmp_path, layers: int, read: float) -> None:
    """The exported graph attends over the whole clip it gets, so its sidecar crops clips to one window; without
    transformer layers there is no window and it reads max_seconds."""
    from zoo.config import FusionModelConfig
    from zoo.export import export, sidecar_path
    from zoo.model import FusionModel

    torch.manual_seed(0)
    options = {"channels": [4, 8], "embed_dim": 16, "num_layers": layers, "num_heads": 2, "max_seconds": 6.0,
               "attention_seconds": 2.0}
    cfg = FusionModelConfig(encoders={"audio": {"name": "mel-cnn", "options": options}}, labels=("a", "b"),
                            hidden_dim=8)
    out = export(FusionModel(cfg).eval(), tmp_path / "m.pt", format="torchscript",
                 example={"audio": [_clip(1, 25), _clip(1.5, 26)]})
    assert json.loads(sidecar_path(out).read_text())["preprocessing"]["audio"]["max_seconds"] == read


def test_a_mel_cnn_clip_encodes_the_same_alone_and_beside_a_longer_one() -> None:
    """Its last STFT frames would read reflection padding alone and zeros in a batch; they are not counted."""
    torch.manual_seed(0)
    for layers in (0, 1):
        enc = encoders.create_encoder("mel-cnn", channels=[8, 16], embed_dim=16, num_layers=layers, num_heads=2,
                                      max_seconds=8.0).eval()
        for seconds in (2.3, 0.37, 1.0):
            short = _clip(seconds, 2)
            with torch.no_grad():
                alone = enc(enc.preprocessor([short]))
                together = enc(enc.preprocessor([_clip(6.0, 3), short]))
            n = int(alone.mask[0].sum())
            assert torch.equal(together.mask[1, :alone.mask.shape[1]], alone.mask[0]) and not together.mask[1, n:].any()
            torch.testing.assert_close(together.tokens[1, :n], alone.tokens[0, :n], rtol=0, atol=1e-5)
            torch.testing.assert_close(together.pooled[1], alone.pooled[0], rtol=0, atol=1e-5)
