"""Audio encoders from ``transformers``: wav2vec2, HuBERT, WavLM (raw waveform), AST and Whisper's encoder
(spectrogram features computed by the model's own AutoFeatureExtractor in the preprocessor).

Registered: ``hf-audio`` (any hub name or local folder; downloads when online), ``tiny-wav2vec2`` (random
2-layer Wav2Vec2, hidden 32, for tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusion_common.hub import hub_or_cache
from fusion_errors import ConfigError

from . import register_encoder
from ._audio_io import (
    WAVEFORM_WINDOW_SECONDS,
    AudioPreprocessor,
    check_windows,
    encode_in_windows,
    frame_mask,
)
from ._contract import Encoder, ModalityOutput

__all__ = ["HFAudioPreprocessor", "HFAudioEncoder"]


class HFAudioPreprocessor(AudioPreprocessor):
    """The standard audio batch plus, for spectrogram models, ``input_features`` from the model's feature extractor.

    ``feature_extractor`` is a hub name / folder (loaded lazily, dropped when pickled) or None for raw-waveform
    models, whose per-clip normalisation (``do_normalize``) the encoder applies in torch.
    """

    def __init__(
        self, feature_extractor: str | None = None, do_normalize: bool = True, input_name: str = "input_features",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.feature_extractor = feature_extractor
        self.input_name = input_name  # the model's keyword for the features (AST: input_values)
        self.do_normalize = bool(do_normalize)
        self._extractor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_extractor": None}

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        batch = super().__call__(items)
        if self.feature_extractor is not None:
            if self._extractor is None:
                from transformers import AutoFeatureExtractor

                self._extractor = AutoFeatureExtractor.from_pretrained(self.feature_extractor,
                                                                       trust_remote_code=False)
            # missing or very short clips use the whole (zero-padded, >= min_seconds) row
            clips = [(w[:n] if n >= 400 else w).numpy() for w, n in zip(batch["waveform"], batch["lengths"].tolist(),
                                                                        strict=True)]
            feats = self._extractor(clips, sampling_rate=self.sample_rate, return_tensors="np")
            batch["input_features"] = torch.from_numpy(np.asarray(feats[self.input_name], dtype=np.float32))
        return batch

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "feature_extractor": self.feature_extractor, "do_normalize": self.do_normalize,
                "input_name": self.input_name}


class HFAudioEncoder(Encoder):
    """tokens = last hidden states [B, T, D] with a frame mask derived from sample lengths; pooled = masked mean.

    Raw-waveform models (wav2vec2, HuBERT, WavLM) read a clip longer than ``window_seconds`` as consecutive windows,
    each encoded as a clip of its own, frames side by side (``encode_in_windows``): attention cost stays that of one
    window however long the recording. Spectrogram models (AST, Whisper) pad or crop to their own window.
    """

    modality = "audio"
    model: Any  # a transformers PreTrainedModel
    preprocessor: HFAudioPreprocessor

    encode_batch_size = 16  # windows of a long clip per model call: 16 x 20 s of wav2vec2 attention is bounded

    def __init__(self, model: Any, preprocessor: HFAudioPreprocessor,
                 window_seconds: float = WAVEFORM_WINDOW_SECONDS) -> None:
        super().__init__()
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # Whisper: keep the audio encoder only
        self.model = model
        self.preprocessor = preprocessor
        self.embed_dim = int(getattr(model.config, "hidden_size", None) or model.config.d_model)
        # [S] samples per window; spectrogram models keep their own window (0: never windowed here)
        self.window_samples = check_windows(window_seconds, preprocessor) if preprocessor.feature_extractor is None \
            else 0

    @property
    def window_seconds(self) -> float | None:
        """Seconds of one window for raw-waveform models (an exported graph reads this much); None for spectrogram
        models, which keep their own window."""
        return self.window_samples / self.preprocessor.sample_rate if self.window_samples else None

    def _frames(self, lengths: Tensor, n_tokens: int) -> Tensor:
        """Valid output frames per clip from its sample count."""
        if self.model.config.model_type == "whisper":
            mel = lengths // 160 + 1
            return (mel - 1) // 2 + 1
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            return self.model._get_feat_extract_output_lengths(lengths).long()
        return torch.full_like(lengths, n_tokens)  # AST-like: every patch token is valid

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = next(self.parameters()).device
        lengths = batch["lengths"].to(device)  # [B]
        present = batch.get("present", lengths > 0).to(device)
        if "input_features" in batch:
            feats = batch["input_features"].to(device)  # [B, F, M] or [B, M, F] spectrogram features
            tokens = self.model(**{self.preprocessor.input_name: feats}).last_hidden_state  # [B, T, D]
        else:
            wav = batch["waveform"].to(device)  # [B, N]
            if wav.shape[1] > self.window_samples and not torch.jit.is_tracing():
                return encode_in_windows(wav, lengths, present, self.window_samples, self.embed_dim,
                                         self.encode_batch_size, self._encode_waveform, pad_tails=False,
                                         min_tail=self.preprocessor.min_samples)
            return self._encode_waveform(wav, lengths, present)
        mask = frame_mask(self._frames(lengths, tokens.shape[1]), tokens.shape[1], present)  # [B, T]
        tokens = tokens * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    def _encode_waveform(self, wav: Tensor, lengths: Tensor, present: Tensor) -> ModalityOutput:
        """Raw-waveform models on clips of at most one window: wav [B, N], lengths [B], present [B]."""
        n = wav.shape[1]
        usable = torch.where(present & (lengths > 0), lengths.clamp_min(min(n, 400)), torch.full_like(lengths, n))
        valid = torch.arange(n, device=wav.device)[None, :] < usable[:, None]  # [B, N]
        if self.preprocessor.do_normalize:  # zero mean, unit variance over each clip's valid samples
            w = valid.to(wav.dtype)
            mean = (wav * w).sum(1, keepdim=True) / usable[:, None]
            var = ((wav - mean) * w).pow(2).sum(1, keepdim=True) / usable[:, None]
            wav = (wav - mean) / (var + 1e-7).sqrt() * w
        tokens = self.model(input_values=wav, attention_mask=valid.long()).last_hidden_state  # [B, T, D]
        mask = frame_mask(self._frames(lengths, tokens.shape[1]), tokens.shape[1], present)  # [B, T]
        tokens = tokens * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    def _layers(self) -> tuple[nn.Module | None, list[nn.Module]]:
        for path in ("encoder.layers", "encoder.layer", "layers"):
            parent: Any = self.model
            for part in path.split(".")[:-1]:
                parent = getattr(parent, part, None)
            layers = getattr(parent, path.split(".")[-1], None)
            if isinstance(layers, nn.ModuleList):
                return parent, list(layers)
        return None, []

    def trainable_blocks(self) -> list[nn.Module]:
        """Front-end (feature encoder, projection, position embedding, norms) as one block, then each layer."""
        parent, layers = self._layers()
        if not layers:
            return [self.model]
        ids = {id(m) for m in layers} | {id(parent)}
        stem = [m for m in self.model.children() if id(m) not in ids]
        if parent is not None and parent is not self.model:
            stem += [m for m in parent.children() if not isinstance(m, nn.ModuleList)]
        return [nn.ModuleList(stem), *layers]

    def lora_target_modules(self) -> list[str]:
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        return [n for n in ("q_proj", "k_proj", "v_proj", "query", "key", "value") if n in names]


@register_encoder("hf-audio")
def hf_audio(
    model_name: str = "facebook/wav2vec2-base",
    max_seconds: float = 10.0,
    allow_resample: bool = True,
    pretrained: bool = True,
    window_seconds: float = WAVEFORM_WINDOW_SECONDS,
) -> HFAudioEncoder:
    """Any transformers audio encoder by hub name or local folder.

    Args:
        model_name: e.g. ``facebook/wav2vec2-base``, ``facebook/hubert-base-ls960``,
            ``MIT/ast-finetuned-audioset-10-10-0.4593``, ``openai/whisper-tiny`` (encoder only).
        max_seconds: clips are cropped to this length (Whisper and AST pad/crop to their own window); raw-waveform
            models read up to 16 windows (320 s with 20 s windows).
        allow_resample: resample clips to the model's rate.
        pretrained: load weights (True) or initialise randomly from the config.
        window_seconds: raw-waveform models read longer clips in windows of this length.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    try:
        # trust_remote_code=False: ``auto_map`` custom code is refused, never run or prompted for (issue 14)
        with hub_or_cache(model_name) as unreachable:
            extractor = AutoFeatureExtractor.from_pretrained(model_name, trust_remote_code=False)
            model = AutoModel.from_pretrained(model_name, trust_remote_code=False) if pretrained else \
                AutoModel.from_config(AutoConfig.from_pretrained(model_name, trust_remote_code=False),
                                      trust_remote_code=False)
    except OSError as e:
        said = f"the Hugging Face Hub is unreachable ({unreachable}) and it is not in the local cache" \
            if unreachable else str(e).splitlines()[0]
        raise ConfigError(f"cannot load audio model {model_name!r}: {said}. Offline? Use 'resemblyzer-lstm'.") from e
    except ValueError as e:
        raise ConfigError(
            f"cannot load audio model {model_name!r}: {str(e).splitlines()[0]} fusion-zoo never runs a model's own "
            "code (trust_remote_code=False); use a model that transformers supports natively."
        ) from e
    input_name = extractor.model_input_names[0]
    probe = extractor([np.zeros(extractor.sampling_rate, np.float32)], sampling_rate=extractor.sampling_rate,
                      return_tensors="np")[input_name]
    spectrogram = np.asarray(probe).ndim > 2  # raw-waveform extractors give [1, N]
    pre = HFAudioPreprocessor(
        feature_extractor=model_name if spectrogram else None,
        input_name=input_name,
        do_normalize=bool(getattr(extractor, "do_normalize", False)),
        sample_rate=int(extractor.sampling_rate),
        max_seconds=max_seconds,
        allow_resample=allow_resample,
    )
    encoder = HFAudioEncoder(model, pre, window_seconds)
    encoder.pretrained = pretrained
    return encoder


@register_encoder("tiny-wav2vec2")
def tiny_wav2vec2(
    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, max_seconds: float = 2.0,
    window_seconds: float = WAVEFORM_WINDOW_SECONDS,
) -> HFAudioEncoder:
    """A random tiny transformers Wav2Vec2 (conv width 32, no SpecAugment) for tests; needs no network."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        apply_spec_augment=False,
    )
    return HFAudioEncoder(Wav2Vec2Model(config), HFAudioPreprocessor(None, True, max_seconds=max_seconds),
                          window_seconds)
