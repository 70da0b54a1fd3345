"""Audio input handling: ``load_audio`` (decoded with ``soundfile`` only) and ``AudioPreprocessor``."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusion_errors import ConfigError, InputError

from ._contract import ModalityOutput, Preprocessor

__all__ = ["load_audio", "AudioPreprocessor", "frame_mask", "check_windows", "encode_in_windows", "MAX_AMPLITUDE",
           "MIN_RATE", "MAX_RATE", "MAX_SECONDS", "MAX_WINDOWS", "WAVEFORM_WINDOW_SECONDS"]

MAX_AMPLITUDE = 1e6  # float samples beyond this overflow float32 power spectra: a scaling mistake, not audio
# sample rates outside this range are a mistake (a rate of 1 Hz would be upsampled to gigabytes before cropping)
MIN_RATE, MAX_RATE = 1_000, 768_000
# the longest clip any audio encoder reads, in seconds (a batch of 32 such clips is 1.2 GB of float32 at 16 kHz);
# longer recordings belong in several rows
MAX_SECONDS = 600.0
MAX_WINDOWS = 16  # an encoder with a fixed window reads a long clip as up to this many windows
# wav2vec2-style (raw-waveform) encoders' window: 1000 frames of attention (pre-trained on crops up to 15.6 s)
WAVEFORM_WINDOW_SECONDS = 20.0

_HINT = (
    "Pass a file path, encoded bytes (wav/flac/ogg), an (array, rate) tuple, a bare array at the encoder's rate, "
    "or a datasets-style {'array', 'sampling_rate'} / {'bytes', 'path'} dict."
)


def _check_rate(rate: Any, name: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float)) or not math.isfinite(rate) \
            or not MIN_RATE <= rate <= MAX_RATE or rate != int(rate):
        raise InputError(f"{name}: sample rate {rate!r} Hz is outside the supported {MIN_RATE}..{MAX_RATE} Hz "
                         "(whole numbers); pass the clip's real rate, e.g. (array, 16000).")
    return int(rate)


def _frames(max_seconds: float | None, rate: int) -> int:
    """Frames to keep at ``rate`` for ``max_seconds`` (-1 = all)."""
    return -1 if max_seconds is None else max(1, math.ceil(max_seconds * rate))


def _decode(data: bytes | str, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode only the first ``max_seconds`` (all when None): a 10-minute file costs what its first seconds do."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data) if isinstance(data, bytes) else data) as f:
            rate = _check_rate(f.samplerate, name)
            wav = f.read(_frames(max_seconds, rate), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise InputError(
            f"{name}: cannot decode audio ({e}); the file is corrupt, truncated or in a format soundfile cannot "
            "read (convert it to WAV or FLAC)."
        ) from e
    return wav, rate  # [N, C]


def _as_array(x: Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{name}: audio array has dtype {arr.dtype}; expected float or integer samples.")
    if arr.dtype.kind == "i":  # signed integer PCM -> [-1, 1)
        arr = arr.astype(np.float32) / float(-np.iinfo(arr.dtype).min)
    elif arr.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is centred on half its range: silence is 128, not 0
        half = float(np.iinfo(arr.dtype).max // 2 + 1)
        arr = (arr.astype(np.float32) - half) / half
    if arr.ndim == 1:
        return arr.astype(np.float32)[:, None]  # [N, 1]
    if arr.ndim == 2:
        # channels-first (C, N) with few channels -> (N, C)
        return (arr.T if arr.shape[0] < arr.shape[1] and arr.shape[0] <= 8 else arr).astype(np.float32)
    raise InputError(f"{name}: audio array of shape {arr.shape} must be [N] or [N, C] / [C, N].")


def load_audio(
    x: Any, target_rate: int, allow_resample: bool = True, rate: int | None = None, name: str = "audio",
    max_seconds: float | None = None,
) -> tuple[Tensor, int]:
    """Load any supported audio input as a mono float32 waveform at ``target_rate``.

    Args:
        x: file path, encoded bytes, numpy array / tensor ([N], [N, C] or [C, N]), ``(array, rate)`` tuple, or a
            datasets dict ``{"array", "sampling_rate"}`` / ``{"bytes", "path"}``. A bare array is taken to be at
            ``rate`` if given, else at ``target_rate``.
        target_rate: the encoder's sample rate in Hz.
        allow_resample: resample other rates (torchaudio.functional.resample); if False a mismatch is an error.
        rate: sample rate of a bare array.
        name: how error messages call this input.
        max_seconds: keep only the first ``max_seconds``: files are decoded only that far and arrays cropped
            before resampling, so memory does not grow with the clip's length (None = the whole clip).

    Returns:
        (waveform [N] float32 mono, target_rate).

    Raises:
        InputError: unreadable, empty, corrupt or non-finite audio, a sample rate outside MIN_RATE..MAX_RATE, or a
            rate mismatch with resampling disabled.
    """
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, np.integer)):
        x, rate = x
    if isinstance(x, Mapping):
        if x.get("array") is not None:
            sr = x.get("sampling_rate")
            wav, src = _as_array(x["array"], name), sr if sr is not None else (rate or target_rate)
        elif x.get("bytes"):
            wav, src = _decode(bytes(x["bytes"]), f"{name} ({x.get('path') or 'bytes'})", max_seconds)
        elif x.get("path"):
            return load_audio(x["path"], target_rate, allow_resample, None, name, max_seconds)
        else:
            raise InputError(f"{name}: dict has no 'array', 'bytes' or 'path'. {_HINT}")
    elif isinstance(x, (str, Path)):
        path = Path(x)
        if not path.is_file():
            raise InputError(f"{name}: audio file {str(path)!r} does not exist; check the path.")
        if path.stat().st_size == 0:
            raise InputError(f"{name}: audio file {str(path)!r} is empty (0 bytes).")
        wav, src = _decode(str(path), f"{name} ({str(path)!r})", max_seconds)
    elif isinstance(x, (bytes, bytearray, memoryview)):
        if len(x) == 0:
            raise InputError(f"{name}: empty bytes; pass the encoded audio file content.")
        wav, src = _decode(bytes(x), name, max_seconds)
    elif isinstance(x, (np.ndarray, Tensor, list)):
        wav, src = _as_array(x, name), target_rate if rate is None else rate
    else:
        raise InputError(f"{name}: unsupported audio type {type(x).__name__}. {_HINT}")
    src = _check_rate(src, name)
    if max_seconds is not None:
        wav = wav[:_frames(max_seconds, src)]  # crop before resampling: never upsample what is dropped
    if wav.shape[0] == 0:
        raise InputError(f"{name}: audio has no samples; pass None for a missing clip.")
    if not np.isfinite(wav).all():
        raise InputError(f"{name}: audio holds NaN or inf samples; clean or drop the clip.")
    peak = float(np.abs(wav).max())
    if peak > MAX_AMPLITUDE:
        raise InputError(f"{name}: audio peak |x| = {peak:.3g} is far outside [-1, 1] (spectrograms would overflow); "
                         "scale float audio to [-1, 1] (integer PCM: divide by its maximum, e.g. 32768).")
    mono = torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1)))  # [N], stereo -> mono by mean
    if src != target_rate:
        if not allow_resample:
            raise InputError(
                f"{name}: sample rate {src} Hz differs from the encoder's {target_rate} Hz; resample it first "
                "or set allow_resample=True."
            )
        import torchaudio.functional as AF

        mono = AF.resample(mono, src, target_rate)  # [N']
    return mono.float(), target_rate


class AudioPreprocessor(Preprocessor):
    """Loads clips as mono waveforms at ``sample_rate``, crops to ``max_seconds`` and zero-pads to a batch.

    Output: ``waveform`` [B, N] float32, ``lengths`` [B] long (valid samples; 0 where missing) and
    ``present`` [B] bool. ``N`` is the longest clip, at least ``min_seconds`` (so convolutional front-ends
    always get enough samples), or ``max_seconds`` when ``pad_to_max``.
    """

    modality = "audio"

    def __init__(
        self,
        sample_rate: int = 16000,
        max_seconds: float = 10.0,
        min_seconds: float = 0.1,
        allow_resample: bool = True,
        pad_to_max: bool = False,
    ) -> None:
        if sample_rate <= 0 or max_seconds <= 0 or not 0 <= min_seconds <= max_seconds:
            raise ConfigError(
                f"need sample_rate > 0 and 0 <= min_seconds <= max_seconds; got {sample_rate}, "
                f"{min_seconds}, {max_seconds}."
            )
        if max_seconds > MAX_SECONDS:
            raise ConfigError(f"max_seconds={max_seconds:g} is above the {MAX_SECONDS:g} s any audio encoder reads "
                              "(memory is sized for it before decoding); split longer recordings into several rows.")
        self.sample_rate = int(sample_rate)
        self.max_seconds = float(max_seconds)
        self.min_seconds = float(min_seconds)
        self.allow_resample = bool(allow_resample)
        self.pad_to_max = bool(pad_to_max)

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        if isinstance(items, (str, bytes, np.ndarray, Tensor, Mapping, tuple)):
            raise InputError("audio batch must be a list of clips; wrap a single clip as [clip].")
        if not isinstance(items, Sequence):
            raise InputError(f"audio batch is a {type(items).__name__}; pass a list of clips (None = missing).")
        max_n = max(1, round(self.max_seconds * self.sample_rate))
        clips: list[Tensor | None] = []
        for i, item in enumerate(items):
            if item is None:
                clips.append(None)
                continue
            wav, _ = load_audio(item, self.sample_rate, self.allow_resample, name=f"audio item {i}",
                                max_seconds=self.max_seconds)
            if wav.numel() >= max_n:
                self._say_cropping()
            clips.append(wav[:max_n])  # crop long clips
        lengths = torch.tensor([0 if c is None else c.numel() for c in clips], dtype=torch.long)  # [B]
        min_n = self.min_samples
        n = max_n if self.pad_to_max else max(int(lengths.max()) if len(clips) else 0, min_n, 1)
        waveform = torch.zeros(len(clips), n)  # [B, N]
        for i, c in enumerate(clips):
            if c is not None:
                waveform[i, : c.numel()] = c
        present = torch.tensor([c is not None for c in clips], dtype=torch.bool)  # [B]
        return {"waveform": waveform, "lengths": lengths, "present": present}

    @property
    def min_samples(self) -> int:
        """The fewest samples a batch is padded to (``min_seconds``): what convolutional front-ends need."""
        return round(self.min_seconds * self.sample_rate)

    def _say_cropping(self) -> None:
        """Once per preprocessor: a clip reached ``max_seconds``, so whatever follows in it is not heard."""
        if not getattr(self, "_said_cropping", False):
            self._said_cropping = True
            warnings.warn(f"audio clips reach max_seconds={self.max_seconds:g} and are cut there; to hear more, "
                          "raise the audio encoder's max_seconds option (whisper-base reads up to 480 s in 30 s "
                          "windows, wav2vec2-style encoders up to 320 s in 20 s windows) or split long recordings "
                          "into several rows.", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "max_seconds": self.max_seconds,
            "min_seconds": self.min_seconds,
            "allow_resample": self.allow_resample,
            "pad_to_max": self.pad_to_max,
        }


def frame_mask(lengths: Tensor, n_frames: int, present: Tensor | None = None) -> Tensor:
    """[B, n_frames] bool from per-sample frame counts ``lengths`` [B]; present rows keep at least one frame."""
    counts = lengths.clamp(max=n_frames)
    if present is not None:
        counts = torch.where(present.to(counts.device), counts.clamp_min(1), counts)
    return torch.arange(n_frames, device=lengths.device)[None, :] < counts[:, None]  # [B, T]


def check_windows(window_seconds: float, preprocessor: AudioPreprocessor) -> int:
    """Samples per window for an encoder that reads long clips in windows of ``window_seconds``; its preprocessor's
    ``max_seconds`` must fit in ``MAX_WINDOWS`` of them (a ConfigError names both fixes)."""
    if not 1.0 <= window_seconds <= 120.0:
        raise ConfigError(f"window_seconds={window_seconds:g} must be in [1, 120] seconds.")
    if preprocessor.max_seconds > window_seconds * MAX_WINDOWS:
        raise ConfigError(f"max_seconds={preprocessor.max_seconds:g} is more than {MAX_WINDOWS} windows of "
                          f"{window_seconds:g} s; lower max_seconds, raise window_seconds, or split longer "
                          "recordings into several rows.")
    return round(window_seconds * preprocessor.sample_rate)


def encode_in_windows(wav: Tensor, lengths: Tensor, present: Tensor, span: int, dim: int, batch_size: int,
                      encode_window: Callable[[Tensor, Tensor, Tensor], ModalityOutput],
                      pad_tails: bool = True, min_tail: int = 1) -> ModalityOutput:
    """Read clips longer than an encoder's window: each row of ``wav`` [B, N] is cut into consecutive windows of
    ``span`` samples (no overlap), every window that holds audio is encoded as a clip of its own by
    ``encode_window(wav [K, S], lengths [K], present [K])``, and the windows' frames sit side by side: tokens
    [B, W·T, D] (T = the frames of a full window, D = ``dim``), mask [B, W·T]; pooled is the mean of every valid
    frame of every window. Windows past a clip's end (and absent rows) never run.

    Full windows run ``batch_size`` at a time. A clip's last, shorter window runs with them, zero-padded, when
    ``pad_tails`` (encoders that mask padding, like Whisper), else on its own at its own length, at least
    ``min_tail`` samples (encoders whose front-end normalises over the whole input, like wav2vec2's group norm,
    would see the padding).
    """
    b, n = wav.shape
    w = -(-n // span)
    windows = torch.nn.functional.pad(wav, (0, w * span - n)).reshape(b * w, span)  # [B·W, S]
    starts = torch.arange(w, device=wav.device) * span  # [W]
    lens = (lengths[:, None] - starts[None, :]).clamp(0, span)  # [B, W] samples of each clip in each window
    lens = torch.where(present[:, None], lens, torch.zeros_like(lens)).reshape(-1)  # [B·W]
    if pad_tails:
        groups = list((lens > 0).nonzero().squeeze(1).split(batch_size))  # windows that hold audio
    else:
        groups = [*(lens == span).nonzero().squeeze(1).split(batch_size),
                  *((lens > 0) & (lens < span)).nonzero().squeeze(1).split(1)]
    groups = [g for g in groups if g.numel()]
    widths = [span if pad_tails else min(span, max(int(lens[g].max()), min_tail)) for g in groups]
    outs = [encode_window(windows[g, :s], lens[g], torch.ones_like(g, dtype=torch.bool))
            for g, s in zip(groups, widths, strict=True)]
    t = max((o.tokens.shape[1] for o in outs), default=1)  # a full window's frames (1 when every row is absent)
    tokens = wav.new_zeros(b * w, t, dim)  # [B·W, T, D]
    mask = torch.zeros(b * w, t, dtype=torch.bool, device=wav.device)  # [B·W, T]
    if outs:
        rows = torch.cat(groups)  # [K]
        got = [torch.nn.functional.pad(o.tokens, (0, 0, 0, t - o.tokens.shape[1])) for o in outs]  # [k, T, D]
        tokens = tokens.index_copy(0, rows, torch.cat(got))
        mask = mask.index_copy(0, rows, torch.cat([torch.nn.functional.pad(o.mask, (0, t - o.mask.shape[1]))
                                                   for o in outs]))
    tokens, mask = tokens.reshape(b, w * t, dim), mask.reshape(b, w * t)  # [B, W·T, D], [B, W·T]
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D]
    return ModalityOutput(tokens, mask, pooled)
