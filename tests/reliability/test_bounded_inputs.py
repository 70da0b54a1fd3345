"""Issue 14 (4): bounded resources. Audio is decoded only up to ``max_seconds`` (before any resampling), odd
sample rates are refused, image decompression bombs and pre-normalised float images are InputErrors."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from encoders._audio_io import AudioPreprocessor, load_audio
from encoders._image_io import load_image
from fusion_errors import InputError

RATE = 48_000


def _wav(path: Path, seconds: int) -> Path:
    """A stereo 48 kHz PCM-16 WAV written 10 s at a time (the test itself never holds the whole clip)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=RATE, channels=2, subtype="PCM_16") as f:
        for _ in range(0, seconds, 10):
            f.write((rng.standard_normal((10 * RATE, 2)) * 0.1).astype(np.float32))
    return path


def _peak(fn) -> int:  # noqa: ANN001
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ten_minute_wav_costs_what_ten_seconds_cost(tmp_path: Path) -> None:
    short, long = _wav(tmp_path / "short.wav", 10), _wav(tmp_path / "long.wav", 600)  # 1.9 MB vs 115 MB
    pre = AudioPreprocessor(sample_rate=16_000, max_seconds=10.0)
    base = _peak(lambda: pre([str(short)]))
    for item in (str(long), long.read_bytes(), {"path": str(long)}):
        grown = _peak(lambda item=item: pre([item])) - base
        if isinstance(item, bytes):
            grown -= len(item)  # the caller's own bytes object is not the decoder's doing
        assert grown < 50 * 2**20, f"{type(item).__name__}: +{grown / 2**20:.0f} MiB over the 10 s clip"
    batch = pre([str(long), str(short)])
    assert batch["waveform"].shape == (2, 160_000) and batch["lengths"].tolist() == [160_000, 160_000]


def test_cropped_decoding_gives_the_first_seconds_exactly(tmp_path: Path) -> None:
    path = _wav(tmp_path / "clip.wav", 20)
    full, _ = load_audio(str(path), RATE)
    head, _ = load_audio(str(path), RATE, max_seconds=2.5)
    assert head.shape == (int(2.5 * RATE),)
    torch.testing.assert_close(head, full[: head.numel()], rtol=0, atol=0)


def test_arrays_are_cropped_before_resampling() -> None:
    wav = np.zeros(8_000 * 600, np.float32)  # 10 minutes at 8 kHz
    out, _ = load_audio((wav, 8_000), 16_000, max_seconds=1.0)
    assert out.shape == (16_000,)


@pytest.mark.parametrize("rate", [1, 999, 10**7, 0, -16000])
def test_sample_rates_outside_the_sane_range_are_refused(rate: int) -> None:
    with pytest.raises(InputError, match=r"outside the supported 1000\.\.768000 Hz"):
        AudioPreprocessor(sample_rate=16_000)([(np.zeros(16, np.float32), rate)])
    with pytest.raises(InputError, match="outside the supported"):
        load_audio({"array": np.zeros(16, np.float32), "sampling_rate": rate}, 16_000)


def test_a_file_with_an_absurd_rate_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(100, np.float32), 100, format="WAV")  # 100 Hz header
    with pytest.raises(InputError, match="sample rate 100 Hz is outside"):
        load_audio(buf.getvalue(), 16_000)


def test_decompression_bomb_is_an_input_error_naming_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 pixels is then > 2x the limit: a "bomb"
    with pytest.raises(InputError, match="decompression-bomb limit of 1000 pixels"):
        load_image(buf.getvalue())


@pytest.mark.parametrize("values", ["normalised", "negative", "above_255"])
def test_pre_normalised_or_out_of_range_float_images_are_refused(values: str) -> None:
    rng = np.random.default_rng(0)
    arr = {"normalised": rng.standard_normal((8, 8, 3)), "negative": -rng.random((8, 8, 3)),
           "above_255": rng.random((8, 8, 3)) * 1000}[values].astype(np.float32)
    with pytest.raises(InputError, match=r"pass raw pixels in \[0, 1\] or \[0, 255\]"):
        load_image(arr)
    assert load_image(rng.random((8, 8, 3)).astype(np.float32)).size == (8, 8)  # [0, 1] stays valid
