"""Builds the bundled ``tridigits`` dataset: degraded handwritten digit + spoken digit + ambiguous text clue.

Run ``python -m recipes.tridigits.build`` (needs ``apt install espeak-ng`` and scikit-learn) to rewrite
``recipes/tridigits/data/`` and its manifest; ``--evaluate`` re-measures the frozen-encoder probe accuracies
(see ``recipes/tridigits/probe.py``). Everything is seeded; rebuilding with one espeak-ng version is byte-identical.
See ``docs/dataset.md`` for the design and the measured numbers.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fusion_errors import MissingDependencyError
from recipes.tridigits.dataset import DATA_DIR, SPLITS, write_manifest

SEED = 20240611
RATE = 16000
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_VOICES = [
    "en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp",
    "en+f2", "en-us+f3", "en-gb-scotland+m3", "en-029+f4", "en-gb-x-rp+m5",
]  # fmt: skip
TEST_VOICES = ["en-us-nyc", "en-gb-x-gbclan+f2", "en-gb-x-gbcwmd+m2"]
SPEEDS = [125, 150, 175, 200]  # words per minute
PITCHES = [25, 40, 55, 70]  # espeak-ng pitch, 0..99
# Degradations that keep every modality alone at or below ~0.90 with the default encoders (a linear probe on frozen
# features and the main job's single-modality test) while fused stays >= 0.97; docs/dataset.md has the measurements.
# Image noise alone could not do it (probe 0.93 at sigma 38, 0.91 at 64): hiding a third instead of a fifth does.
NOISE_STD = 40.0  # image noise, grey levels of 255
SNR_DB = (-12.0, 1.0)  # audio background noise, dB, uniform per clip
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}

# (digits the clue allows, phrasings); every set has 2..5 digits so a clue alone never names the digit
CLUES: list[tuple[frozenset[int], list[str]]] = [
    (frozenset({0, 2, 4, 6, 8}), ["an even number", "divisible by two", "an even digit"]),
    (frozenset({1, 3, 5, 7, 9}), ["an odd number", "not divisible by two", "an odd digit"]),
    (frozenset({2, 3, 5, 7}), ["a prime", "a prime number", "only divisible by one and itself"]),
    (frozenset({0, 1, 2, 3, 4}), ["below five", "smaller than five", "less than 5"]),
    (frozenset({5, 6, 7, 8, 9}), ["five or more", "at least five", "not below 5"]),
    (frozenset({7, 8, 9}), ["greater than six", "bigger than 6", "above six"]),
    (frozenset({0, 1, 2}), ["less than three", "smaller than 3", "below three"]),
    (frozenset({3, 4, 5, 6}), ["between three and six", "from 3 to 6 inclusive"]),
    (frozenset({0, 3, 6, 9}), ["a multiple of three", "divisible by 3"]),
    (frozenset({0, 4, 8}), ["a multiple of four", "divisible by 4"]),
    (frozenset({0, 6, 8, 9}), ["written with a closed loop", "a digit with a loop", "drawn with a round hole"]),
    (frozenset({1, 4, 7}), ["drawn with only straight strokes", "made of straight lines"]),
    (frozenset({0, 1, 4, 9}), ["a perfect square", "a square number"]),
    (frozenset({1, 2, 4, 8}), ["a power of two", "a power of 2"]),
    (frozenset({0, 1, 8}), ["a perfect cube", "a cube number"]),
    (frozenset({0, 1, 3, 6}), ["a triangular number", "a triangle number"]),
    (frozenset({1, 3}), ["an odd number below five", "odd and smaller than 5"]),
    (frozenset({6, 8}), ["an even number above five", "even and bigger than 5"]),
    (frozenset({5, 7, 9}), ["odd and at least five", "an odd number of five or more"]),
    (frozenset({0, 2, 4}), ["even and below five", "an even number under 5"]),
    (frozenset({1, 2, 6}), ["spelled with three letters", "a digit whose English name has three letters"]),
    (frozenset({0, 4, 5, 9}), ["spelled with four letters", "a digit whose English name has four letters"]),
    (frozenset({3, 7, 8}), ["spelled with five letters", "a digit whose English name has five letters"]),
    (frozenset({2, 3}), ["a digit whose name starts with t", "spelled beginning with the letter T"]),
    (frozenset({4, 5}), ["a digit whose name starts with f", "spelled beginning with the letter F"]),
    (frozenset({6, 7}), ["a digit whose name starts with s", "spelled beginning with the letter S"]),
] + [
    (frozenset({k - 1, k + 1}), [f"a neighbour of {WORDS[k]}", f"one away from {k}", f"next to {WORDS[k]}"])
    for k in range(1, 9)
]
WRAPPERS = ["{}", "It is {}.", "Hint: {}.", "The digit is {}.", "Think of {}.", "Clue: {}", "This one is {}."]


def _stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split name per sample, 70/10/20 within every class."""
    out = np.empty(len(labels), dtype=object)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(FRACTIONS["train"] * len(idx))
        n_val = round(FRACTIONS["validation"] * len(idx))
        out[idx[:n_train]], out[idx[n_train : n_train + n_val]], out[idx[n_train + n_val :]] = (
            "train", "validation", "test",
        )  # fmt: skip
    return out


def degrade_image(img8: np.ndarray, rng: np.random.Generator, size: int = 32) -> bytes:
    """One 8x8 digit (0..16) → upscaled, a fifth hidden, noisy grayscale PNG bytes (size x size)."""
    from PIL import Image

    img = Image.fromarray((img8 * (255 / 16)).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    x = np.array(img, dtype=np.float32)  # [H, W], 0..255
    cut = size // 3 + int(rng.integers(-size // 16, size // 16 + 1))  # hide about a third, from a random side
    sides: list[Any] = [np.s_[:cut], np.s_[-cut:], np.s_[:, :cut], np.s_[:, -cut:]]
    x[sides[int(rng.integers(4))]] = 0.0
    noisy = x + rng.normal(0.0, NOISE_STD, x.shape)  # float64
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def synthesise(word: str, voice: str, speed: int, pitch: int, workdir: Path) -> np.ndarray:
    """Speaks ``word`` with espeak-ng → float32 mono at 16 kHz with the leading/trailing silence trimmed."""
    import soundfile as sf
    from scipy.signal import resample_poly

    path = workdir / "say.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word]
    subprocess.run(cmd, check=True, capture_output=True)
    wav, sr = sf.read(path, dtype="float32")
    wav = resample_poly(wav, RATE, sr).astype(np.float32)
    loud = np.flatnonzero(np.abs(wav) > 0.02 * np.abs(wav).max())
    return wav[max(0, loud[0] - 800) : loud[-1] + 800]


def noisy_flac(wav: np.ndarray, rng: np.random.Generator) -> bytes:
    """Adds seeded red background noise (SNR_DB) and encodes 16 kHz 8-bit FLAC at -6 dBFS peak."""
    import soundfile as sf
    from scipy.signal import lfilter

    noise = lfilter([1.0], [1.0, -0.9], rng.normal(size=len(wav))).astype(np.float32)  # red noise, all bands
    snr_db = rng.uniform(*SNR_DB)
    noise *= np.sqrt(np.mean(wav**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    mix = wav + noise
    mix *= 0.5 / np.abs(mix).max()  # 8 bits suffice under the added noise; keeps the files small
    buf = io.BytesIO()
    sf.write(buf, mix, RATE, format="FLAC", subtype="PCM_S8")
    return buf.getvalue()


def pixel_confusers(images: list[bytes], labels: np.ndarray, seed: int) -> np.ndarray:
    """Per sample, the wrong digit a cross-validated pixel classifier finds likeliest for its degraded image."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).reduce(2), dtype=np.float32).ravel() / 255 for b in images])
    proba = cross_val_predict(LogisticRegression(C=0.05, max_iter=500), x, labels, cv=5, method="predict_proba")
    proba[np.arange(len(labels)), labels] = -1.0  # [N, 10]
    return proba.argmax(1)


def make_clue(label: int, rng: np.random.Generator, avoid: int | None = None) -> tuple[str, list[int]]:
    """A random true clue about ``label`` that rules out ``avoid`` when one can → (text, allowed digits sorted)."""
    options = [(digits, phrasings) for digits, phrasings in CLUES if label in digits]
    options = [o for o in options if avoid not in o[0]] or options
    weights = np.array([{2: 1.0, 3: 0.1}.get(len(d), 0.02) for d, _ in options])  # mostly the sharpest clues
    digits, phrasings = options[rng.choice(len(options), p=weights / weights.sum())]
    text = WRAPPERS[rng.integers(len(WRAPPERS))].format(phrasings[rng.integers(len(phrasings))])
    return text[0].upper() + text[1:], sorted(digits)


def build_rows(seed: int = SEED) -> dict[str, list[dict]]:
    """Every sample as a row dict, grouped by split name."""
    from sklearn.datasets import load_digits

    if shutil.which("espeak-ng") is None:
        raise MissingDependencyError("espeak-ng is not on PATH; install it with `apt install espeak-ng` and rerun")
    digits = load_digits()
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    split_of = _stratified_splits(labels, rng)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    cache: dict[tuple, np.ndarray] = {}
    images = [degrade_image(img8, rng) for img8 in digits.images]
    confusers = pixel_confusers(images, labels, seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (image, label, split) in enumerate(zip(images, labels, split_of, strict=True)):
            voices = TEST_VOICES if split == "test" else TRAIN_VOICES
            voice = voices[rng.integers(len(voices))]
            speed, pitch = int(rng.choice(SPEEDS)), int(rng.choice(PITCHES))
            key = (WORDS[label], voice, speed, pitch)
            if key not in cache:
                cache[key] = synthesise(*key, workdir=Path(tmp))
            text, clue_digits = make_clue(label, rng, avoid=int(confusers[i]))
            rows[split].append({
                "sample_id": i, "label": int(label), "image": {"bytes": image, "path": None},
                "audio": noisy_flac(cache[key], rng), "text": text, "clue_digits": clue_digits,
                "voice": voice, "speed": speed, "pitch": pitch,
            })  # fmt: skip
    return rows


def write_dataset(out_dir: Path = DATA_DIR, seed: int = SEED) -> dict[str, int]:
    """Builds every split, writes ``<split>.parquet`` + ``manifest.json`` into ``out_dir`` → rows per split."""
    import datasets

    from recipes.tridigits.dataset import FEATURES

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in build_rows(seed).items():
        ds = datasets.Dataset.from_list(rows, features=FEATURES)
        ds.to_parquet(str(out_dir / f"{split}.parquet"))
        counts[split] = len(rows)
    write_manifest(out_dir, seed=seed)
    return counts


def main(argv: list[str] | None = None) -> None:
    """Command line: build the dataset, or ``--evaluate`` the frozen-encoder probes on the shipped files."""
    parser = argparse.ArgumentParser(prog="python -m recipes.tridigits.build", description=__doc__)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--evaluate", action="store_true", help="measure single-modality and fused probes")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tridigits_embeddings")
    args = parser.parse_args(argv)
    if args.evaluate:
        from recipes.tridigits.probe import evaluate

        for name, acc in evaluate(args.out, args.cache).items():
            print(f"{name:>20s}: {acc:.4f}")
        return
    counts = write_dataset(args.out, args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {counts} to {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
