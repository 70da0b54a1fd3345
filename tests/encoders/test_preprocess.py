"""Raw-input handling: odd but valid inputs are converted, bad ones raise InputError saying what to do."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import encoders
from encoders._audio_io import AudioPreprocessor, load_audio
from encoders._image_io import ImagePreprocessor, load_image
from encoders.text_hf import check_texts
from fusion_errors import ConfigError, InputError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# text ----------------------------------------------------------------------------------------------
def test_text_errors_name_index_and_fix() -> None:
    with pytest.raises(InputError, match=r"item 1 is empty.*None"):
        check_texts(["ok", "   "])
    with pytest.raises(InputError, match=r"item 2 is a int.*str\(\.\.\.\)"):
        check_texts(["ok", None, 7])
    with pytest.raises(InputError, match="single string"):
        check_texts("not a list")
    assert check_texts(["a", None]) == ["a", None]


def test_long_text_is_truncated_with_one_window() -> None:
    enc = encoders.create_encoder("tiny-text", max_length=16, max_windows=1)
    batch = enc.preprocessor(["word " * 500, "short"])
    assert batch["input_ids"].shape == (2, 16)
    assert enc(batch).mask.sum(1).tolist()[0] == 16


# images --------------------------------------------------------------------------------------------
def test_image_modes_become_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent → white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    deep = np.full((5, 6), 40000, dtype=np.uint16)
    deep[0, 0] = 0
    img16 = Image.fromarray(deep).convert("I;16")
    out16 = load_image(img16)
    assert out16.mode == "RGB" and out16.getpixel((1, 1)) == (255, 255, 255) and out16.getpixel((0, 0)) == (0, 0, 0)
    assert load_image(Image.new("LA", (3, 3), (128, 255))).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(Image.new("P", (3, 3))).mode == "RGB"
    assert load_image(np.ones((3, 8, 8), dtype=np.float32)).size == (8, 8)  # CHW float in [0, 1]
    assert load_image(torch.zeros(8, 9, 3, dtype=torch.uint8)).size == (9, 8)


def test_image_sources(tmp_path: Path) -> None:
    data = _png(Image.new("RGB", (7, 5), (1, 2, 3)))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (data, str(path), path, {"bytes": data, "path": "x.png"}, {"bytes": None, "path": str(path)}):
        img = load_image(source)
        assert img.size == (7, 5) and img.getpixel((0, 0)) == (1, 2, 3)


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_turns_photos_upright(tmp_path: Path) -> None:
    # a 2 x 3 picture with a distinct value per pixel, stored as a phone stores a photo taken sideways
    stored = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    upright = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 6: np.rot90(stored, k=-1),  # 6: 90° clockwise
               8: np.rot90(stored, k=1)}
    for orientation, expected in upright.items():
        data = _with_orientation(stored, orientation)
        path = tmp_path / f"o{orientation}.png"
        path.write_bytes(data)
        for source in (data, path, {"bytes": data, "path": "o.png"}, Image.open(io.BytesIO(data))):
            np.testing.assert_array_equal(np.asarray(load_image(source)), expected, err_msg=str(orientation))
    # the preprocessor sees the upright picture: a sideways and an upright copy give the same pixels
    pre = ImagePreprocessor(image_size=16, crop_pct=1.0)
    sideways = pre([_with_orientation(stored, 6)])["pixel_values"]
    torch.testing.assert_close(sideways, pre([np.ascontiguousarray(np.rot90(stored, k=-1))])["pixel_values"])


def _photo_jpeg(w: int = 1600, h: int = 1200) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_big_jpegs_decode_at_the_smallest_dct_scale_the_resize_allows(tmp_path: Path) -> None:
    data = _photo_jpeg()  # 1600 x 1200
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert load_image(data).size == (1600, 1200)  # no hint: full size
    # JPEG scales are 1/1, 1/2, 1/4, 1/8; the smallest whose both sides stay >= min_side is chosen
    assert load_image(data, min_side=100).size == (200, 150)
    assert load_image(path, min_side=500).size == (800, 600)
    assert load_image({"bytes": data, "path": "p.jpg"}, min_side=250).size == (400, 300)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    assert load_image(png.getvalue(), min_side=100).size == (1600, 1200)  # other formats decode whole
    pre = ImagePreprocessor(image_size=224)  # resizes the short side to 256: decoded at 1/2 (800 x 600 >= 512)
    assert pre.decode_side == 512
    full = pre.crop(load_image(data))
    fast = pre.crop(load_image(data, min_side=pre.decode_side))
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 1.5  # the same photo, within JPEG rounding
    torch.testing.assert_close(pre([data])["pixel_values"][0], pre.normalize_into(torch.empty(3, 224, 224), fast))


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="empty"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(InputError, match="corrupt"):
        load_image(b"\x89PNG not really an image")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(_png(Image.new("RGB", (64, 64)))[:40])  # truncated file
    with pytest.raises(InputError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="unsupported image type"):
        load_image(3.5)
    with pytest.raises(InputError, match="image item 1"):
        ImagePreprocessor(32)([np.zeros((4, 4, 3), np.uint8), b"junk"])
    with pytest.raises(ConfigError):
        ImagePreprocessor(image_size=2)


# audio ---------------------------------------------------------------------------------------------
def test_audio_sources_and_stereo(tmp_path: Path) -> None:
    left = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # [N, 2]
    path = tmp_path / "s.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wav, rate = load_audio(str(path), 16000)
    assert rate == 16000 and wav.shape == (1600,) and torch.allclose(wav, torch.from_numpy(left) / 2, atol=1e-6)
    assert torch.equal(load_audio(path.read_bytes(), 16000)[0], wav)
    assert torch.equal(load_audio({"bytes": None, "path": str(path)}, 16000)[0], wav)
    assert torch.allclose(load_audio(stereo.T, 16000)[0], wav)  # channels-first array
    resampled, _ = load_audio({"array": left, "sampling_rate": 8000}, 16000)
    assert resampled.shape == (3200,)
    assert load_audio((left, 32000), 16000)[0].shape == (800,)


def test_integer_pcm_arrays_scale_like_decoded_files(tmp_path: Path) -> None:
    # 8-bit PCM is unsigned, silence at 128; 16-bit is signed: both map onto [-1, 1) as libsndfile decodes them
    u8 = np.array([0, 64, 128, 192, 255], dtype=np.uint8)
    torch.testing.assert_close(load_audio(u8, 16000)[0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 127 / 128]))
    i16 = np.array([-32768, -16384, 0, 16384, 32767], dtype=np.int16)
    path = tmp_path / "pcm16.wav"
    sf.write(path, i16, 16000, subtype="PCM_16")
    torch.testing.assert_close(load_audio(i16, 16000)[0], load_audio(path, 16000)[0], rtol=0, atol=0)
    torch.testing.assert_close(load_audio(i16, 16000)[0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 32767 / 32768]))


def test_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"8000 Hz.*16000 Hz.*allow_resample=True"):
        load_audio({"array": np.zeros(800, np.float32), "sampling_rate": 8000}, 16000, allow_resample=False)
    with pytest.raises(InputError, match="NaN or inf"):
        load_audio(np.array([0.1, np.nan], dtype=np.float32), 16000)
    with pytest.raises(InputError, match="no samples"):
        load_audio(np.zeros(0, np.float32), 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(InputError, match="corrupt.wav"):
        load_audio(corrupt, 16000)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes((ASSETS / "voice_a_1.wav").read_bytes()[:30])
    with pytest.raises(InputError, match="cut.wav"):
        load_audio(truncated, 16000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(empty, 16000)
    with pytest.raises(InputError, match="unsupported audio type"):
        load_audio(object(), 16000)
    with pytest.raises(InputError, match="audio item 0"):
        AudioPreprocessor(allow_resample=False)([(np.zeros(100, np.float32), 44100)])


def test_audio_crop_and_pad() -> None:
    pre = AudioPreprocessor(sample_rate=1000, max_seconds=0.5, min_seconds=0.1)
    batch = pre([np.ones(900, np.float32), np.ones(20, np.float32), None])
    assert batch["waveform"].shape == (3, 500) and batch["lengths"].tolist() == [500, 20, 0]
    assert batch["waveform"][1, 20:].abs().sum() == 0
    assert pre([np.ones(20, np.float32)])["waveform"].shape == (1, 100)  # padded to min_seconds


@pytest.mark.parametrize("name", ["tiny-text", "tiny-image", "mel-cnn", "tiny-wav2vec2"])
def test_all_none_batch(name: str) -> None:
    enc = encoders.create_encoder(name)
    batch = enc.preprocessor([None, None])
    assert batch["present"].tolist() == [False, False]
    out = enc(batch)
    assert not out.mask.any() and out.pooled.abs().sum() == 0


def test_image_batch_equals_the_per_image_formula() -> None:
    """Every image (normalised in place, one at a time) must equal resize -> centre crop -> (x / 255 - mean) / std
    computed on its own with PIL and numpy, exactly; missing items stay zeros."""
    pre = ImagePreprocessor(image_size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_pct=0.875,
                            interpolation="bilinear")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),  # tall
              None,
              Image.fromarray(rng.integers(0, 256, (7, 90), dtype=np.uint8), mode="L"),  # tiny, wide, grey
              Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="RGBA")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about valid images (e.g. no read-only numpy buffers)
        out = pre(images)
        single = pre.to_tensor(load_image(images[0], "ref"))
    assert torch.equal(single, out["pixel_values"][0])
    assert out["pixel_values"].shape == (4, 3, 24, 24) and out["present"].tolist() == [True, False, True, True]
    assert not out["pixel_values"][1].any()
    for i in (0, 2, 3):
        img = load_image(images[i], "ref")
        scale = round(24 / 0.875)
        w, h = img.size
        r = scale / min(w, h)
        img = img.resize((max(24, round(w * r)), max(24, round(h * r))), Image.Resampling.BILINEAR)
        left, top = (img.width - 24) // 2, (img.height - 24) // 2
        ref = np.asarray(img.crop((left, top, left + 24, top + 24)), dtype=np.float32) / 255.0  # [S, S, 3]
        ref = (ref - np.array([0.4, 0.5, 0.6], np.float32)) / np.array([0.2, 0.25, 0.3], np.float32)
        assert torch.equal(out["pixel_values"][i], torch.from_numpy(ref.transpose(2, 0, 1).copy())), i
        assert torch.equal(pre.to_tensor(load_image(images[i], "ref")), out["pixel_values"][i])


def test_missing_images_are_zero_rows_even_in_reused_memory() -> None:
    from encoders._image_io import ImagePreprocessor

    pre = ImagePreprocessor(image_size=32)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(6)]
    for _ in range(3):  # batches of the same size leave non-zero floats in the allocator's free blocks
        full = pre(pictures)["pixel_values"]
        del full
    out = pre([pictures[0], None, pictures[1], None, None, pictures[2]])
    assert out["present"].tolist() == [True, False, True, False, False, True]
    assert all(float(out["pixel_values"][i].abs().max()) == 0.0 for i in (1, 3, 4))
    torch.testing.assert_close(out["pixel_values"][[0, 2, 5]], pre(pictures[:3])["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_grey_images_resize_as_one_channel_with_the_pixels_of_their_rgb_conversion(interpolation: str) -> None:
    """Greyscale images are resized as one channel (a third of the work) and replicated after: the batch must be
    exactly what the same images converted to RGB first give."""
    pre = ImagePreprocessor(image_size=40, interpolation=interpolation)
    rng = np.random.default_rng(1)
    grey = [rng.integers(0, 256, (32, 32), dtype=np.uint8),  # upscaled, as tridigits
            rng.integers(0, 256, (300, 170), dtype=np.uint8),  # downscaled, tall
            rng.integers(0, 65536, (20, 50), dtype=np.uint16)]  # 16-bit, rescaled to 8 first
    grey_items = [grey[0], _png(Image.fromarray(grey[1], mode="L")), grey[2]]
    rgb_items = [load_image(g, "ref").convert("RGB") for g in grey]
    assert all(load_image(g, "g", keep_gray=True).mode == "L" for g in grey_items)
    assert load_image(grey_items[1], "g").mode == "RGB"  # callers that do not ask get RGB, as before
    out, ref = pre(grey_items), pre(rgb_items)
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
    assert bool((out["pixel_values"][:, 0] != out["pixel_values"][:, 1]).any())  # per-channel mean/std applied


@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_pixel_encoders_see_grey_images_as_their_rgb_conversion(color: str) -> None:
    from encoders.image_pixels import EfficientNetPixelsPreprocessor, PixelPreprocessor

    rng = np.random.default_rng(2)
    grey = [Image.fromarray(rng.integers(0, 256, (33, 45), dtype=np.uint8), mode="L") for _ in range(2)]
    rgb = [g.convert("RGB") for g in grey]
    thumb = PixelPreprocessor(image_size=12, color=color)
    both = EfficientNetPixelsPreprocessor(ImagePreprocessor(image_size=32), thumb)
    for pre in (thumb, both):
        a, b = pre(grey), pre(rgb)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_to_tensor_gives_an_rgb_preprocessor_three_channels_from_a_grey_image() -> None:
    from encoders.image_pixels import PixelPreprocessor

    grey = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8), mode="L")
    rgb, gray = PixelPreprocessor(image_size=8, color="rgb"), PixelPreprocessor(image_size=8, color="gray")
    assert torch.equal(rgb.to_tensor(grey), rgb.to_tensor(grey.convert("RGB")))  # [3, 8, 8], not [1, 8, 8]
    assert gray.to_tensor(grey).shape == (1, 8, 8)
