"""Held-out speakers (docs/heldout_speakers.md): spoken digits by unseen speakers + degraded handwritten digits.

A proxy for a user's recordings like the Free Spoken Digit Dataset, made here: ``audio/*.wav`` (8 kHz mono int16,
silence-trimmed, random gain, mild background noise) spoken by espeak-ng *speakers* (an accent + a voice variant,
random speed and pitch per clip); ``images/*.png`` (28x28 grayscale, heavily degraded handwritten digits from
scikit-learn's ``load_digits``); ``train.csv``, ``validation.csv``, ``test.csv`` with the columns
``image,audio,label,speaker``. Validation has the train speakers; the test speakers (accents *and* variants) are
never heard in training, and the test images are never seen in training. ``speaker`` is an extra column fits
ignore. ``--data.dataset heldout-speakers`` prepares the folder once (needs ``espeak-ng`` on PATH and
scikit-learn) under ``~/.cache/fusion-zoo/heldout-speakers``; nothing of the data is in the repository.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fusion_common import swap_folder
from fusion_errors import DataError, MissingDependencyError

from .easyvqa import write_csv
from .sources import register_source

__all__ = ["DEFAULT_DIR", "TRAIN_SPEAKERS", "TEST_SPEAKERS", "SIZES", "RATE", "IMAGE_SIZE", "MARKER", "COLUMNS",
           "prepare", "degrade"]

DEFAULT_DIR = Path("~/.cache/fusion-zoo/heldout-speakers").expanduser()
RATE = 8000  # like the Free Spoken Digit Dataset
#: train/validation speakers: accent + voice variant; the test ones share neither the accent nor the variant
TRAIN_SPEAKERS = ("en-us+m1", "en-us+f2", "en-gb+m3", "en-gb-x-rp+f4", "en-gb-x-gbcwmd+m7")
TEST_SPEAKERS = ("en-gb-scotland+f3", "en-029+m5", "en-us-nyc+m6", "en-gb-x-gbclan+f5")
SIZES = {"train": 1800, "validation": 200, "test": 600}
SPEED = (120, 210)  # words per minute, uniform per clip
PITCH = (20, 80)  # espeak-ng pitch 0..99, uniform per clip
SNR_DB = (15.0, 35.0)  # mild white background noise, like a quiet room recording
IMAGE_SIZE = 28
CONTRAST = (0.35, 0.7)  # share of the grey range the strokes span
NOISE = (0.15, 0.25)  # pixel noise std, of the grey range
IMAGE_POOLS = {"train": 0.65, "validation": 0.1, "test": 0.25}  # share of the 1,797 images per split (by image)
MARKER = "prepared.json"
_FORMAT = 1


def degrade(img8: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One 8x8 digit (0..16) -> a ``size``² uint8 image: upscaled, blurred, shifted, low contrast, noisy.

    Heavy on purpose: the real check's images gave 0.48 with a logistic regression on raw pixels.
    """
    from PIL import Image, ImageFilter

    img = Image.fromarray((img8 * (255 / 16)).astype(np.uint8)).resize((size - 8, size - 8),
                                                                       Image.Resampling.BILINEAR)
    canvas = Image.new("L", (size, size))
    dx, dy = (int(v) for v in rng.integers(2, 7, 2))  # random placement: the digit is not centred
    canvas.paste(img, (dx, dy))
    canvas = canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 1.8))))
    x = np.asarray(canvas, dtype=np.float32) / 255  # [H, W] 0..1
    contrast, background = rng.uniform(CONTRAST[0], CONTRAST[1]), rng.uniform(0.0, 0.4)
    x = background + contrast * x
    x = x + rng.normal(0.0, rng.uniform(NOISE[0], NOISE[1]), x.shape)  # heavy pixel noise
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def _speak(word: str, speaker: str, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    """One clip as int16 at 8 kHz: espeak-ng (random speed/pitch), trimmed, gain, mild noise."""
    from scipy.signal import resample_poly

    from recipes.tridigits.build import synthesise  # 16 kHz float32, silence trimmed

    wav16 = synthesise(word, speaker, int(rng.integers(*SPEED)), int(rng.integers(*PITCH)), workdir)
    wav = resample_poly(wav16, 1, 2).astype(np.float64)  # [T] at 8 kHz
    loud = np.flatnonzero(np.abs(wav) > 0.05 * np.abs(wav).max())  # trim like FSDD: a little silence left
    pad = int(rng.integers(0, 400))
    wav = wav[max(0, loud[0] - pad): loud[-1] + int(rng.integers(0, 400))]
    snr = rng.uniform(*SNR_DB)
    wav = wav + rng.normal(size=len(wav)) * np.sqrt(np.mean(wav**2) / 10 ** (snr / 10))
    wav *= rng.uniform(0.1, 0.9) / np.abs(wav).max()
    return np.round(wav * 32767).astype(np.int16)


def _image_pools(labels: np.ndarray, rng: np.random.Generator) -> dict[str, dict[int, np.ndarray]]:
    """Indices of the digit images each split may use, per class; no image is in two splits."""
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in IMAGE_POOLS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr, n_va = round(IMAGE_POOLS["train"] * len(idx)), round(IMAGE_POOLS["validation"] * len(idx))
        pools["train"][c], pools["validation"][c] = idx[:n_tr], idx[n_tr:n_tr + n_va]
        pools["test"][c] = idx[n_tr + n_va:]
    return pools


COLUMNS = ("image", "audio", "label", "speaker")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_csv(path, COLUMNS, [[row[c] for c in COLUMNS] for row in rows])


def _is_current(out: Path, seed: int) -> bool:
    try:
        meta = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _FORMAT and meta.get("seed") == seed


def prepare(out_dir: str | Path = DEFAULT_DIR, seed: int = 0, force: bool = False) -> Path:
    """Write the held-out-speakers folder to ``out_dir`` (reused when already written with ``seed``); returns it."""
    import soundfile as sf
    from PIL import Image

    out = Path(out_dir).expanduser().resolve()
    if _is_current(out, seed) and not force:
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(f"{out} exists and was not written by the heldout-speakers source; choose a new folder.")
    if shutil.which("espeak-ng") is None:
        raise MissingDependencyError("espeak-ng is not on PATH; install it with `apt install espeak-ng` and rerun")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("prepare needs scikit-learn: pip install scikit-learn") from e
    from recipes.tridigits.build import WORDS

    digits = load_digits()
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    pools = _image_pools(labels, rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "audio").mkdir()
        (tmp / "images").mkdir()
        counts: dict[str, int] = {}
        for split, n in SIZES.items():
            speakers = TEST_SPEAKERS if split == "test" else TRAIN_SPEAKERS
            rows = []
            for i in range(n):
                label = i % 10  # balanced classes, like FSDD
                speaker = speakers[int(rng.integers(len(speakers)))]
                name = f"{split}_{i:04d}"
                wav = _speak(WORDS[label], speaker, rng, tmp)
                sf.write(tmp / "audio" / f"{name}.wav", wav, RATE, subtype="PCM_16")
                img = degrade(digits.images[rng.choice(pools[split][label])], rng)
                Image.fromarray(img, mode="L").save(tmp / "images" / f"{name}.png")
                rows.append({"image": f"images/{name}.png", "audio": f"audio/{name}.wav", "label": label,
                             "speaker": speaker.replace("+", "_")})
            order = rng.permutation(len(rows))
            _write_csv(tmp / f"{split}.csv", [rows[j] for j in order])
            counts[split] = n
        (tmp / "say.wav").unlink(missing_ok=True)
        meta = {"format": _FORMAT, "seed": seed, "rows": counts, "train_speakers": TRAIN_SPEAKERS,
                "test_speakers": TEST_SPEAKERS, "rate": RATE, "image_size": IMAGE_SIZE,
                "source": "espeak-ng speech + scikit-learn load_digits images"}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        swap_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@register_source("heldout-speakers", "spoken digits (0-9) by speakers never heard in training + degraded "
                 "handwritten digits",
                 "made by fusion-zoo: espeak-ng speech (its voices, 5 train and 4 unseen test speakers) and "
                 "scikit-learn's load_digits images (UCI optical digits, CC BY 4.0), prepared into "
                 "~/.cache/fusion-zoo/heldout-speakers")
def _heldout_speakers_source() -> tuple[datasets.DatasetDict, Path | None]:
    from .formats import load_source

    splits, base, _ = load_source(str(prepare(DEFAULT_DIR)), None, None, None)
    return splits, base
