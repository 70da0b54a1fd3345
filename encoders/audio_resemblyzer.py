"""``resemblyzer-lstm``: a speaker encoder (GE2E-style 3-layer LSTM, 256-d) with Resemblyzer's pretrained weights.

The module is the project's own torch code; only the weights come from the ``pretrained.pt`` that the
``resemblyzer`` wheel ships. The front-end is a mel spectrogram matching Resemblyzer's
(16 kHz, 40 Slaney mel bands, 25 ms Hann window, 10 ms hop, power spectrum, no log), computed real-valued
(``encoders._stft``: the STFT as a conv1d with a DFT basis) so it exports to ONNX; gradients flow
from the embedding back to the waveform. Resemblyzer's voice-activity trimming is not applied.

Under ``torch.jit.trace`` (TorchScript and ONNX export) the partial windows are computed with tensor ops over
every candidate window (:meth:`ResemblyzerEncoder._partials_traceable`), so the exported graph takes any
clip length; eager runs keep the cheaper per-clip window lists. Both give the same embedding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_errors import CheckpointError, ConfigError

from . import register_encoder
from ._audio_io import AudioPreprocessor, frame_mask
from ._contract import Encoder, ModalityOutput
from ._stft import real_mel_spectrogram
from ._weights import load_weights_file, resemblyzer_file

__all__ = ["ResemblyzerEncoder"]

RATE = 16000
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms
N_MELS = 40
HIDDEN = 256
PARTIAL_FRAMES = 160  # 1.6 s windows
TARGET_RMS = 10 ** (-30 / 20)  # -30 dBFS


class ResemblyzerEncoder(Encoder):
    """Mel spectrogram → 3 LSTM layers → linear → ReLU → L2 norm.

    tokens: [B, T, 256] per-frame embeddings (T = samples // 160 + 1), pooled: [B, 256] utterance embedding.
    ``pooling="partials"`` averages the embeddings of 1.6 s windows taken 1/1.3 s apart (as Resemblyzer's
    ``embed_utterance``); ``"last"`` takes the final valid frame of one pass over the whole clip.
    """

    encode_batch_size = 1024  # an LSTM step costs about the same for 64 or 1024 rows on CPU

    modality = "audio"

    def __init__(
        self, pooling: str = "partials", normalize_volume: bool = True, max_seconds: float = 10.0,
        rate: float = 1.3, min_coverage: float = 0.75,
    ) -> None:
        super().__init__()
        import torchaudio

        if pooling not in ("partials", "last"):
            raise ConfigError(f"pooling={pooling!r} must be 'partials' or 'last'.")
        self.pooling = pooling
        self.normalize_volume = normalize_volume
        self.frame_step = max(1, round(RATE / rate / HOP))
        self.min_coverage = min_coverage
        self.embed_dim = HIDDEN
        self.preprocessor = AudioPreprocessor(sample_rate=RATE, max_seconds=max_seconds, min_seconds=0.1)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, power=2.0,
            center=True, pad_mode="constant", norm="slaney", mel_scale="slaney",
        )
        self.lstm = nn.ModuleList([nn.LSTM(N_MELS if i == 0 else HIDDEN, HIDDEN, batch_first=True) for i in range(3)])
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def load_resemblyzer(self, path: str | None = None) -> ResemblyzerEncoder:
        """Load Resemblyzer's ``pretrained.pt`` (its single 3-layer LSTM maps onto our three 1-layer LSTMs)."""
        state = load_weights_file(path or resemblyzer_file())
        mapped = {}
        for key, value in state.items():
            if key.startswith("lstm."):
                param, layer = key[len("lstm."):].rsplit("_l", 1)
                mapped[f"lstm.{layer}.{param}_l0"] = value
            elif key.startswith("linear."):
                mapped[key] = value
        own = {k for k in self.state_dict() if not k.startswith("mel.")}
        if set(mapped) != own:
            raise CheckpointError(f"{path or 'pretrained.pt'}: keys {sorted(set(mapped) ^ own)} do not match.")
        self.load_state_dict(mapped, strict=False)
        return self

    def _run(self, mels: Tensor) -> Tensor:
        """[B, T, 40] mel frames → [B, T, 256] L2-normalised per-frame embeddings."""
        h = mels
        for layer in self.lstm:
            h, _ = layer(h)  # [B, T, 256]
        return F.normalize(F.relu(self.linear(h)), dim=-1, eps=1e-8)

    def _windows(self, n_samples: int) -> list[int]:
        """Start frames of the partial windows for a clip of ``n_samples`` (Resemblyzer's slicing rule)."""
        n_frames = math.ceil((n_samples + 1) / HOP)
        steps = max(1, n_frames - PARTIAL_FRAMES + self.frame_step + 1)
        starts = list(range(0, steps, self.frame_step))
        coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
        if coverage < self.min_coverage and len(starts) > 1:
            starts = starts[:-1]
        return starts

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = self.linear.weight.device
        wav = batch["waveform"].to(device)  # [B, N]
        lengths = batch["lengths"].to(device)  # [B]
        present = batch.get("present", lengths > 0)
        valid = torch.arange(wav.shape[1], device=device)[None, :] < lengths[:, None]  # [B, N]
        wav = wav * valid
        if self.normalize_volume:  # raise quiet clips to -30 dBFS (never lower loud ones)
            rms = (wav.pow(2).sum(1) / lengths.clamp_min(1)).sqrt()  # [B]
            wav = wav * (TARGET_RMS / rms.clamp_min(1e-8)).clamp_min(1.0)[:, None]
        if torch.jit.is_tracing():  # shapes must follow the inputs: pad by one window, weigh every candidate
            wav = F.pad(wav, (0, PARTIAL_FRAMES * HOP))  # [B, N + 25600]
            mels = real_mel_spectrogram(self.mel, wav).transpose(1, 2)  # [B, F, 40]
            starts = None
        else:
            starts = [self._windows(int(n)) for n in lengths.tolist()]
            need = max(wav.shape[1], max(s[-1] + PARTIAL_FRAMES for s in starts) * HOP)
            wav = F.pad(wav, (0, need - wav.shape[1]))  # [B, N']
            mels = real_mel_spectrogram(self.mel, wav).transpose(1, 2)  # [B, F, 40]
        n_frames = lengths // HOP + 1  # frames whose centre lies inside the clip
        tokens = self._run(mels)  # [B, F, 256]
        mask = frame_mask(n_frames, tokens.shape[1], present)  # [B, F]
        tokens = tokens * mask[..., None]
        if self.pooling == "last":
            last = (mask.sum(1) - 1).clamp_min(0)  # [B]
            pooled = tokens[torch.arange(tokens.shape[0], device=device), last]  # [B, 256]
        elif starts is None:
            pooled = self._partials_traceable(mels, lengths)
        else:
            pooled = self._partials(mels, starts)
        return ModalityOutput(tokens, mask, pooled)

    def _partials_traceable(self, mels: Tensor, lengths: Tensor) -> Tensor:
        """:meth:`_partials` with :meth:`_windows`' rule as tensor ops: [B, F, 40], [B] -> [B, 256].

        Every window start ``0, step, 2 step, ...`` that fits in ``F`` frames is embedded; each clip weighs only
        the starts its own length allows (same count and coverage rule as :meth:`_windows`).
        """
        starts = torch.arange(0, mels.shape[1] - PARTIAL_FRAMES + 1, self.frame_step, device=mels.device)  # [W]
        idx = starts[:, None] + torch.arange(PARTIAL_FRAMES, device=mels.device)  # [W, 160]
        windows = mels[:, idx]  # [B, W, 160, 40]
        emb = self._run(windows.flatten(0, 1))[:, -1]  # [B*W, 256]
        emb = emb.reshape(mels.shape[0], -1, HIDDEN)  # [B, W, 256]
        step = self.frame_step
        n_frames = (lengths + HOP) // HOP  # ceil((n + 1) / HOP)
        steps = (n_frames - PARTIAL_FRAMES + step + 1).clamp_min(1)
        count = (steps + step - 1) // step  # windows before the coverage rule
        coverage = (lengths - (count - 1) * step * HOP).to(mels.dtype) / (PARTIAL_FRAMES * HOP)
        count = count - ((coverage < self.min_coverage) & (count > 1)).to(count.dtype)
        idx = torch.arange(emb.shape[1], device=mels.device)  # [W]
        weight = (idx[None, :] < count[:, None]).to(emb.dtype)  # [B, W]
        mean = (emb * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)  # [B, 256]
        return F.normalize(mean, dim=-1, eps=1e-8)

    def _partials(self, mels: Tensor, starts: list[list[int]]) -> Tensor:
        """Mean of the window embeddings, L2-normalised: [B, F, 40] → [B, 256]."""
        b, w = mels.shape[0], max(len(s) for s in starts)
        start = torch.tensor([s + [s[-1]] * (w - len(s)) for s in starts], device=mels.device)  # [B, W]
        weight = torch.tensor([[1.0] * len(s) + [0.0] * (w - len(s)) for s in starts], device=mels.device)  # [B, W]
        idx = start[..., None] + torch.arange(PARTIAL_FRAMES, device=mels.device)  # [B, W, 160]
        windows = mels[torch.arange(b, device=mels.device)[:, None, None], idx]  # [B, W, 160, 40]
        emb = self._run(windows.flatten(0, 1))[:, -1].view(b, w, HIDDEN)  # [B, W, 256]
        mean = (emb * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)  # [B, 256]
        return F.normalize(mean, dim=-1, eps=1e-8)

    def trainable_blocks(self) -> list[nn.Module]:
        return [*self.lstm, self.linear]


@register_encoder("resemblyzer-lstm")
def resemblyzer_lstm(
    pooling: Literal["partials", "last"] = "partials",
    normalize_volume: bool = True,
    max_seconds: float = 10.0,
    pretrained: bool = True,
) -> ResemblyzerEncoder:
    """Resemblyzer's speaker encoder (256-d, 16 kHz), weights from the offline ``resemblyzer`` wheel.

    Args:
        pooling: ``partials`` (Resemblyzer's utterance embedding) or ``last`` (final frame, one pass).
        normalize_volume: raise quiet clips to -30 dBFS as Resemblyzer's ``preprocess_wav`` does.
        max_seconds: clips are cropped to this length.
        pretrained: load ``pretrained.pt`` (True) or start from random weights.
    """
    encoder = ResemblyzerEncoder(pooling, normalize_volume, max_seconds)
    encoder.pretrained = pretrained
    return encoder.load_resemblyzer() if pretrained else encoder
