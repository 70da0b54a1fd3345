"""A folder a real user would bring: mixed WAV rates/channels/sample types, tiny clips, PNG modes, usual column
names and an extra column. ``fusion-zoo fit --data.data_dir FOLDER`` must train on it (tiny encoders, no weights)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from recipes import cli

TINY = ["--model.encoders", '{"audio": "tiny-whisper", "image": "pixels"}', "--model.hidden_dim", "16",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]

# (rate, channels, soundfile subtype, seconds): 8 kHz int16 like FSDD, 44.1 kHz stereo float, a 0.05 s clip ...
AUDIO_KINDS = [(8000, 1, "PCM_16", 0.6), (44100, 2, "FLOAT", 0.4), (16000, 1, "PCM_24", 0.05),
               (22050, 2, "PCM_U8", 0.25), (8000, 1, "DOUBLE", 0.2)]
IMAGE_MODES = ["L", "RGBA", "P", "RGB", "LA", "I;16"]


def _image(mode: str, label: int, rng: np.random.Generator) -> Image.Image:
    x = np.clip(rng.normal(60, 30, (28, 28)), 0, 255)
    x[4 + 2 * label: 8 + 2 * label, 6:22] = 230  # a bar whose height says the label
    img = Image.fromarray(x.astype(np.uint8), mode="L")
    if mode == "P":
        return img.convert("RGB").quantize(16)
    if mode == "I;16":
        return Image.fromarray((x * 256).astype(np.uint16))
    return img.convert(mode)


def _write_folder(root: Path, columns: tuple[str, str, str]) -> None:
    """train/validation/test CSVs with columns (image, audio, label) named ``columns`` plus ``speaker``."""
    rng = np.random.default_rng(0)
    (root / "wav").mkdir(parents=True)
    (root / "png").mkdir()
    k = 0
    for split, n in (("train", 10), ("validation", 5), ("test", 5)):
        rows = []
        for i in range(n):
            label = i % 2
            rate, channels, subtype, seconds = AUDIO_KINDS[k % len(AUDIO_KINDS)]
            t = np.arange(int(rate * seconds)) / rate
            wav = 0.5 * np.sin(2 * np.pi * (300 + 500 * label) * t)  # [T]
            sf.write(root / "wav" / f"{k}.wav", np.stack([wav] * channels, 1), rate, subtype=subtype)
            _image(IMAGE_MODES[k % len(IMAGE_MODES)], label, rng).save(root / "png" / f"{k}.png")
            rows.append({columns[0]: f"png/{k}.png", columns[1]: f"wav/{k}.wav", columns[2]: ["zero", "one"][label],
                         "speaker": f"s{k % 3}"})
            k += 1
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*columns, "speaker"])
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("columns", [("image", "audio", "label"), ("image_path", "audio_path", "label")])
def test_fit_on_a_mixed_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    columns: tuple[str, str, str]) -> None:
    _write_folder(tmp_path / "data", columns)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSION_ZOO_CACHE", str(tmp_path / "cache"))
    assert cli.main(["fit", "--data.data_dir", str(tmp_path / "data"), *TINY]) == 0
    [metrics] = list((tmp_path / "runs").rglob("metrics.json"))
    test = json.loads(metrics.read_text())["test"]
    assert set(test) == {"fused", "audio", "image"}  # the extra `speaker` column is no modality
    assert test["fused"]["n"] == 5


def test_a_folder_without_a_label_column_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    _write_folder(tmp_path / "data", ("image", "audio", "digit"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--data.data_dir", str(tmp_path / "data"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'label'" in err and "--data.columns" in err


def test_default_encoders_preprocessors_read_every_file_of_the_folder(tmp_path: Path) -> None:
    """The preprocessors of the default encoders (whisper-base: 16 kHz, >= 0.1 s; efficientnet-lite0-pixels: 64 px
    + 16 px RGB thumbnail), built as those factories build them but without weights, read every odd file."""
    from encoders._audio_io import AudioPreprocessor
    from encoders._image_io import ImagePreprocessor
    from encoders.image_pixels import EfficientNetPixelsPreprocessor, PixelPreprocessor

    _write_folder(tmp_path, ("image", "audio", "label"))
    wavs, pngs = sorted((tmp_path / "wav").iterdir()), sorted((tmp_path / "png").iterdir())
    audio = AudioPreprocessor(sample_rate=16000, max_seconds=30.0, min_seconds=0.1)([str(p) for p in wavs])
    seconds = [AUDIO_KINDS[int(p.stem) % len(AUDIO_KINDS)][3] for p in wavs]
    assert audio["waveform"].shape[1] == round(max(seconds) * 16000)
    assert [round(int(n) / 16000, 2) for n in audio["lengths"]] == [round(s, 2) for s in seconds]  # resampled
    assert audio["waveform"].abs().max() <= 1.0 and audio["waveform"].abs().max() > 0.3  # int/float scaled alike
    image = EfficientNetPixelsPreprocessor(ImagePreprocessor(64, (0.5,) * 3, (0.5,) * 3),
                                           PixelPreprocessor(16, "rgb"))([str(p) for p in pngs])
    assert image["pixel_values"].shape == (len(pngs), 3, 64, 64) and image["pixels"].shape == (len(pngs), 3, 16, 16)
    assert bool(image["present"].all())
    thumbs = image["pixels"][:, 0].flatten(1)  # [N, 256]: no mode was converted to a blank picture
    assert bool((thumbs.std(1) > 0.1).all())
