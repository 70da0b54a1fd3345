"""``mel-cnn``: a small log-mel spectrogram CNN (optionally followed by transformer layers), trained from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fusion_errors import ConfigError

from . import register_encoder
from ._audio_io import AudioPreprocessor, frame_mask
from ._blocks import ConvBlock
from ._contract import Encoder, ModalityOutput
from ._stft import real_mel_spectrogram

__all__ = ["MelCNNEncoder"]


class MelCNNEncoder(Encoder):
    """Log-mel (25 ms window, 10 ms hop) → conv blocks (each halves mel and time) → mean over mel →
    linear to ``embed_dim`` → optional transformer layers.

    The transformer layers attend within consecutive windows of ``attention_seconds`` (30 s: 375 tokens with the
    default 3 blocks), so a long recording costs memory linear in its length, not quadratic (a 600 s clip would
    need a 7,500 x 7,500 attention matrix per head and sample). Clips up to that length, which includes the
    default ``max_seconds`` of 10, attend over the whole clip.

    tokens: [B, T', embed_dim] with T' = frames / 2**len(channels); pooled: masked mean of tokens.
    Only frames whose STFT window ends inside the clip count, and padded frames are zeroed after every block, so
    a clip's output does not depend on the batch's padding (in eval mode).
    """

    modality = "audio"

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 64,
        channels: Sequence[int] = (32, 64, 128),
        embed_dim: int = 128,
        num_layers: int = 0,
        num_heads: int = 4,
        max_seconds: float = 10.0,
        attention_seconds: float = 30.0,
    ) -> None:
        super().__init__()
        import torchaudio

        self.pretrained = False  # random init: trained at the heads' learning rate

        if not channels or embed_dim % num_heads:
            raise ConfigError(f"need >= 1 conv channel and embed_dim={embed_dim} divisible by num_heads={num_heads}.")
        self.embed_dim = int(embed_dim)
        if not 1.0 <= attention_seconds <= 120.0:
            raise ConfigError(f"attention_seconds={attention_seconds:g} must be in [1, 120] seconds: the transformer "
                              "layers attend within windows of that length.")
        self.attention_seconds = float(attention_seconds)
        self.hop = round(0.010 * sample_rate)
        #: tokens per attention window: frames per second (sample_rate / hop) halved by every conv block
        self.attention_tokens = max(1, round(attention_seconds * sample_rate / self.hop / 2 ** len(channels)))
        self.preprocessor = AudioPreprocessor(sample_rate=sample_rate, max_seconds=max_seconds, min_seconds=0.1)
        n_fft = round(0.025 * sample_rate)
        self.half_window = n_fft // 2  # a centred STFT frame reads this many samples either side of its centre
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=self.hop, n_mels=n_mels)
        widths = [1, *channels]
        self.blocks = nn.ModuleList([ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.proj = nn.Linear(widths[-1], embed_dim)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(embed_dim, num_heads, 2 * embed_dim, dropout=0.1, batch_first=True)
                for _ in range(num_layers)
            ]
        )

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = self.proj.weight.device
        wav = batch["waveform"].to(device)  # [B, N]
        lengths = batch["lengths"].to(device)  # [B]
        present = batch.get("present", lengths > 0).to(device)
        logmel = (real_mel_spectrogram(self.mel, wav) + 1e-6).log()  # [B, M, F] (real-valued: exports to ONNX)
        # valid frames: those whose STFT window ends inside the clip. The last ones read past its end, which is
        # reflection padding when the clip is alone and zeros beside a longer clip: counting them made a clip's
        # features (through its normalisation, all of them) depend on the rest of the batch
        n = ((lengths - self.half_window) // self.hop + 1).clamp_min(0)
        mask = frame_mask(n, logmel.shape[-1], present)  # [B, F]
        w = mask[:, None, :].to(logmel.dtype)  # [B, 1, F]
        count = (w.sum(-1, keepdim=True) * logmel.shape[1]).clamp_min(1.0)  # [B, 1, 1]
        mean = (logmel * w).sum((1, 2), keepdim=True) / count
        std = (((logmel - mean) * w).pow(2).sum((1, 2), keepdim=True) / count).sqrt().clamp_min(1e-3)
        x = ((logmel - mean) / std * w)[:, None]  # [B, 1, M, F] per-clip normalised
        for block in self.blocks:
            x = block(x)  # [B, C, M/2, F/2]
            n = (n + 1) // 2
            mask = frame_mask(n, x.shape[-1], present)  # [B, F']
            x = x * mask[:, None, None, :]
        tokens = self.proj(x.mean(2).transpose(1, 2))  # [B, T, D]
        ignore = ~mask & present[:, None]  # absent rows attend everywhere (no all-masked rows → no NaN)
        if len(self.layers):
            tokens = self._attend(tokens, ignore)  # [B, T, D]
        tokens = tokens * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    @property
    def window_seconds(self) -> float | None:
        """With transformer layers, what an exported graph reads: it attends over one window (export crops there)."""
        return self.attention_seconds if len(self.layers) else None

    def _attend(self, tokens: Tensor, ignore: Tensor) -> Tensor:
        """The transformer layers over ``tokens`` [B, T, D] in windows of ``attention_tokens`` from each clip's
        start (``ignore`` [B, T]: padding keys); a clip's windows do not depend on the rest of the batch."""
        b, t, d = tokens.shape
        w = self.attention_tokens
        if t <= w:  # one window: the whole clip
            for layer in self.layers:
                tokens = layer(tokens, src_key_padding_mask=ignore)  # [B, T, D]
            return tokens
        n = -(-t // w)  # windows per clip
        x = F.pad(tokens, (0, 0, 0, n * w - t)).reshape(b * n, w, d)  # [B*n, W, D]
        keys = F.pad(ignore, (0, n * w - t), value=True).reshape(b * n, w)  # [B*n, W]
        keys = keys & ~keys.all(1, keepdim=True)  # a window of padding only attends everywhere (no NaN); masked later
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=keys)  # [B*n, W, D]
        return x.reshape(b, n * w, d)[:, :t]  # [B, T, D]

    def trainable_blocks(self) -> list[nn.Module]:
        return [*self.blocks, self.proj, *self.layers]

    def lora_target_modules(self) -> list[str]:
        return ["linear1", "linear2"] if len(self.layers) else []


@register_encoder("mel-cnn", finetune="full")
def mel_cnn(
    sample_rate: int = 16000,
    n_mels: int = 64,
    channels: list[int] | None = None,
    embed_dim: int = 128,
    num_layers: int = 0,
    num_heads: int = 4,
    max_seconds: float = 10.0,
    attention_seconds: float = 30.0,
) -> MelCNNEncoder:
    """A log-mel CNN trained from scratch (random init; no pretrained weights), so trainable by default
    (``finetune: full``); frozen it would give random features.

    Args:
        sample_rate: input rate in Hz (other rates are resampled by the preprocessor).
        n_mels: mel bands.
        channels: conv widths, one block each (default ``[32, 64, 128]``); tests use ``[8, 16]``.
        embed_dim: token / pooled width.
        num_layers, num_heads: transformer layers after the CNN (0 = none).
        max_seconds: clips are cropped to this length.
        attention_seconds: the transformer layers attend within consecutive windows of this length (1-120 s), so
            memory grows linearly with the clip, not quadratically.
    """
    return MelCNNEncoder(sample_rate, n_mels, tuple(channels or (32, 64, 128)), embed_dim, num_layers, num_heads,
                         max_seconds, attention_seconds)
