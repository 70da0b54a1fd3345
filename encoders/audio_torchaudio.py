"""``torchaudio.pipelines`` wav2vec2-family bundles (WAV2VEC2_BASE, HUBERT_BASE, WAVLM_BASE, ...).

Registered: ``torchaudio-bundle`` (downloads the bundle's weights when online) and ``tiny-torchaudio-wav2vec2``
(the same ``Wav2Vec2Model`` class built by ``torchaudio.models.wav2vec2_model`` with tiny random parameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_errors import ConfigError, MissingDependencyError

from . import register_encoder
from ._audio_io import (
    WAVEFORM_WINDOW_SECONDS,
    AudioPreprocessor,
    check_windows,
    encode_in_windows,
    frame_mask,
)
from ._contract import Encoder, ModalityOutput

__all__ = ["TorchaudioWav2Vec2Encoder"]


class TorchaudioWav2Vec2Encoder(Encoder):
    """A torchaudio ``Wav2Vec2Model``: tokens = final transformer output [B, T, D], pooled = masked mean.

    A clip longer than ``window_seconds`` is read as consecutive windows, each encoded as a clip of its own, frames
    side by side (``encode_in_windows``), so attention cost stays that of one window."""

    modality = "audio"
    model: Any  # torchaudio.models.Wav2Vec2Model
    preprocessor: AudioPreprocessor

    encode_batch_size = 16  # windows of a long clip per model call

    def __init__(self, model: Any, sample_rate: int, normalize_waveform: bool, max_seconds: float,
                 window_seconds: float = WAVEFORM_WINDOW_SECONDS) -> None:
        super().__init__()
        self.model = model
        self.normalize_waveform = normalize_waveform
        self.embed_dim = int(model.encoder.feature_projection.projection.out_features)
        self.preprocessor = AudioPreprocessor(sample_rate=sample_rate, max_seconds=max_seconds, min_seconds=0.1)
        self.window_samples = check_windows(window_seconds, self.preprocessor)  # [S] samples per window

    @property
    def window_seconds(self) -> float:
        """Seconds of one window: longer clips are read window by window; an exported graph reads one."""
        return self.window_samples / self.preprocessor.sample_rate

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = next(self.parameters()).device
        wav = batch["waveform"].to(device)  # [B, N]
        lengths = batch["lengths"].to(device)  # [B]
        present = batch.get("present", lengths > 0).to(device)
        if wav.shape[1] > self.window_samples and not torch.jit.is_tracing():
            return encode_in_windows(wav, lengths, present, self.window_samples, self.embed_dim,
                                     self.encode_batch_size, self._encode_window, pad_tails=False,
                                     min_tail=self.preprocessor.min_samples)
        return self._encode_window(wav, lengths, present)

    def _encode_window(self, wav: Tensor, lengths: Tensor, present: Tensor) -> ModalityOutput:
        """Clips of at most one window: wav [B, N], lengths [B], present [B] → tokens [B, T, D]."""
        n = wav.shape[1]
        # absent rows run at full length so no row is entirely masked inside attention
        usable = torch.where(present & (lengths > 0), lengths.clamp_min(min(n, 400)), torch.full_like(lengths, n))
        if self.normalize_waveform:
            wav = F.layer_norm(wav, wav.shape[1:])
        tokens, frames = self.model(wav, usable)  # [B, T, D], [B]
        mask = frame_mask(frames.long(), tokens.shape[1], present)  # [B, T]
        tokens = tokens * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    def trainable_blocks(self) -> list[nn.Module]:
        """Feature extractor + projection + positional conv as one block, then each transformer layer."""
        enc = self.model.encoder
        stem = nn.ModuleList([self.model.feature_extractor, enc.feature_projection, enc.transformer.pos_conv_embed,
                              enc.transformer.layer_norm])
        return [stem, *enc.transformer.layers]

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj"]


@register_encoder("torchaudio-bundle")
def torchaudio_bundle(bundle: str = "WAV2VEC2_BASE", max_seconds: float = 10.0,
                      window_seconds: float = WAVEFORM_WINDOW_SECONDS) -> TorchaudioWav2Vec2Encoder:
    """A ``torchaudio.pipelines`` wav2vec2/HuBERT/WavLM bundle by name (weights are downloaded when online).

    Args:
        bundle: attribute of ``torchaudio.pipelines``, e.g. ``WAV2VEC2_BASE``, ``HUBERT_BASE``, ``WAVLM_BASE``.
        max_seconds: clips are cropped to this length (at most 16 windows).
        window_seconds: longer clips are read in windows of this length.
    """
    import torchaudio.pipelines as pipelines

    obj = getattr(pipelines, bundle, None)
    if obj is None or not hasattr(obj, "get_model"):
        raise ConfigError(f"{bundle!r} is not a torchaudio.pipelines bundle; try WAV2VEC2_BASE or HUBERT_BASE.")
    try:
        model = obj.get_model()
    except Exception as e:  # noqa: BLE001 - download failures come in many types
        raise MissingDependencyError(
            f"cannot fetch torchaudio bundle {bundle} ({e}); offline? use 'resemblyzer-lstm' or 'mel-cnn'."
        ) from e
    return TorchaudioWav2Vec2Encoder(model, int(obj.sample_rate), bool(getattr(obj, "_normalize_waveform", False)),
                                     max_seconds, window_seconds)


@register_encoder("tiny-torchaudio-wav2vec2")
def tiny_torchaudio_wav2vec2(embed_dim: int = 32, num_layers: int = 2, num_heads: int = 2,
                             max_seconds: float = 2.0, window_seconds: float = WAVEFORM_WINDOW_SECONDS
                             ) -> TorchaudioWav2Vec2Encoder:
    """torchaudio's Wav2Vec2Model with tiny random parameters (conv width 32), for tests."""
    from torchaudio.models import wav2vec2_model

    convs = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
    model = wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=convs, extractor_conv_bias=False,
        encoder_embed_dim=embed_dim, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=2, encoder_num_layers=num_layers, encoder_num_heads=num_heads,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=2 * embed_dim, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None,
    )
    return TorchaudioWav2Vec2Encoder(model, 16000, False, max_seconds, window_seconds)
