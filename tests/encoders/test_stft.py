"""The real-valued mel front-end equals torchaudio's complex one; Resemblyzer's traced windows equal eager ones."""

from __future__ import annotations

import pytest
import torch

from encoders._stft import real_mel_spectrogram


@pytest.mark.parametrize("kw", [
    {"n_fft": 400, "hop_length": 160, "n_mels": 40, "power": 2.0, "pad_mode": "constant", "norm": "slaney",
     "mel_scale": "slaney"},  # resemblyzer-lstm
    {"n_fft": 400, "hop_length": 160, "n_mels": 64},  # mel-cnn (reflect padding)
    {"n_fft": 256, "hop_length": 100, "n_mels": 16, "power": 1.0, "center": False},
])
def test_real_mel_equals_torchaudio(kw: dict) -> None:
    torchaudio = pytest.importorskip("torchaudio")
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, **kw)
    wav = torch.randn(3, 12345, generator=torch.Generator().manual_seed(0)) * 0.1
    want = mel(wav)
    got = real_mel_spectrogram(mel, wav)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_resemblyzer_traceable_partials_equal_eager() -> None:
    from encoders.audio_resemblyzer import HOP, PARTIAL_FRAMES, ResemblyzerEncoder

    enc = ResemblyzerEncoder().eval()  # random weights: the window arithmetic is what is tested
    # 30000 samples: a second window 0.77 s in would cover 69% < 75%, so it is dropped; 36000: it covers 93%
    lengths = torch.tensor([3000, 16000, 30000, 36000, 52000, 64000])
    mels = torch.randn(6, 64000 // HOP + 1 + PARTIAL_FRAMES, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = enc._partials(mels, [enc._windows(int(n)) for n in lengths])
        traced = enc._partials_traceable(mels, lengths)
    assert [len(enc._windows(int(n))) for n in lengths] == [1, 1, 1, 2, 3, 4]  # Resemblyzer's slicing rule
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
