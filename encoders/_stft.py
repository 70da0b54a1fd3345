"""A real-valued mel spectrogram that computes what ``torchaudio.transforms.MelSpectrogram`` computes.

torchaudio's transform calls ``torch.stft(return_complex=True)``; complex tensors neither export to ONNX nor
trace with a dynamic clip length. Here the STFT is a strided ``conv1d`` with a fixed windowed-DFT basis (real and
imaginary rows), followed by the power/magnitude and the transform's own mel filterbank buffer, so encoders keep
their torchaudio module (same state-dict keys, same settings) and only swap the call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["real_mel_spectrogram"]


def _basis(n_fft: int, window: Tensor) -> Tensor:
    """[2 * (n_fft // 2 + 1), 1, n_fft] rows cos and -sin of the one-sided DFT, times the (centred) window."""
    win = window.to(torch.float64)
    if win.numel() < n_fft:  # torch.stft centres a shorter window inside n_fft
        left = (n_fft - win.numel()) // 2
        win = F.pad(win, (left, n_fft - win.numel() - left))
    n = torch.arange(n_fft, dtype=torch.float64, device=window.device)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=window.device)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # [K, n_fft]
    return (torch.cat([torch.cos(angle), -torch.sin(angle)]) * win)[:, None, :]  # [2K, 1, n_fft]


def real_mel_spectrogram(mel: torch.nn.Module, waveform: Tensor) -> Tensor:
    """``mel(waveform)`` for a ``torchaudio.transforms.MelSpectrogram`` ``mel``, without complex tensors.

    [B, N] -> [B, n_mels, N // hop + 1] (``center=True``) or [B, n_mels, (N - n_fft) // hop + 1].
    Equal to torchaudio's output within float32 rounding (tested in tests/encoders).
    """
    spec_t: Any = mel.spectrogram  # torchaudio.transforms.Spectrogram (Module attributes type as Tensor | Module)
    n_fft, hop, power = int(spec_t.n_fft), int(spec_t.hop_length), spec_t.power
    if spec_t.normalized or not spec_t.onesided or power is None:
        raise NotImplementedError("real_mel_spectrogram supports onesided, unnormalised power/magnitude spectra.")
    x = waveform[:, None, :]  # [B, 1, N]
    if spec_t.center:
        x = F.pad(x, (n_fft // 2, n_fft // 2), mode=spec_t.pad_mode)  # [B, 1, N + n_fft]
    basis = _basis(n_fft, spec_t.window).to(device=x.device, dtype=x.dtype)
    spec = F.conv1d(x, basis, stride=hop)  # [B, 2K, F]
    real, imag = spec.chunk(2, dim=1)  # [B, K, F] each
    energy = real.square() + imag.square()  # |X|^2
    if power != 2.0:
        energy = energy.clamp_min(0).pow(power / 2.0)
    mel_scale: Any = mel.mel_scale  # torchaudio.transforms.MelScale
    fb = mel_scale.fb.to(x.dtype)  # [K, n_mels]
    return torch.matmul(energy.transpose(1, 2), fb).transpose(1, 2)  # [B, n_mels, F]
