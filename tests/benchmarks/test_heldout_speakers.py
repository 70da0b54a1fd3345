"""The held-out-speakers proxy (recipes/heldout_speakers.py, benchmarks/heldout_speakers.py): a tiny folder (needs
espeak-ng), no weights."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
hs = importlib.import_module("benchmarks.heldout_speakers")
source = importlib.import_module("recipes.heldout_speakers")  # the data itself: `--data.dataset heldout-speakers`

from fusion_errors import DataError  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt install espeak-ng)")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_speaker_sets_share_neither_accent_nor_variant() -> None:
    def parts(speakers: tuple[str, ...]) -> tuple[set[str], set[str]]:
        return {s.split("+")[0] for s in speakers}, {s.split("+")[1] for s in speakers}

    (train_accents, train_variants), (test_accents, test_variants) = parts(hs.TRAIN_SPEAKERS), parts(hs.TEST_SPEAKERS)
    assert not train_accents & test_accents and not train_variants & test_variants


def test_image_pools_are_disjoint_and_cover_every_class() -> None:
    labels = np.repeat(np.arange(10), 20)
    pools = source._image_pools(labels, np.random.default_rng(0))
    for c in range(10):
        used = [set(pools[s][c].tolist()) for s in ("train", "validation", "test")]
        assert all(used) and not used[0] & used[1] and not used[0] & used[2] and not used[1] & used[2]
        assert set().union(*used) == set(np.flatnonzero(labels == c).tolist())
        assert all(labels[i] == c for u in used for i in u)


def test_degrade_keeps_a_trace_of_the_digit() -> None:
    """Averaged over many noise draws, a degraded '1' (a vertical bar) is brighter in its centre column than at the
    left edge: the degradation is heavy per image but still carries the digit."""
    one = np.zeros((8, 8))
    one[1:7, 3:5] = 16
    rng = np.random.default_rng(0)
    mean = np.mean([hs.degrade(one, rng).astype(np.float32) for _ in range(200)], axis=0)  # [28, 28]
    assert mean.shape == (hs.IMAGE_SIZE, hs.IMAGE_SIZE)
    assert mean[6:22, 12:16].mean() > mean[6:22, 0:3].mean() + 10


@needs_espeak
def test_prepare_writes_a_user_folder_with_disjoint_test_speakers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "SIZES", {"train": 10, "validation": 4, "test": 6})
    out = hs.prepare(tmp_path / "data", seed=1)
    train, val, test = (_rows(out / f"{s}.csv") for s in ("train", "validation", "test"))
    assert list(train[0]) == ["image", "audio", "label", "speaker"]
    assert (len(train), len(val), len(test)) == (10, 4, 6)
    assert {r["label"] for r in train} == {str(d) for d in range(10)}
    seen = {r["speaker"] for r in train + val}
    assert seen <= {s.replace("+", "_") for s in hs.TRAIN_SPEAKERS}
    assert {r["speaker"] for r in test} <= {s.replace("+", "_") for s in hs.TEST_SPEAKERS}
    for r in train + val + test:
        info = sf.info(out / r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
        assert 0.15 < info.duration < 2.0  # a trimmed single word
        with Image.open(out / r["image"]) as img:
            assert img.mode == "L" and img.size == (28, 28)
    assert json.loads((out / "prepared.json").read_text())["rows"] == {"train": 10, "validation": 4, "test": 6}
    before = (out / "train.csv").stat().st_mtime_ns
    assert hs.prepare(out, seed=1) == out and (out / "train.csv").stat().st_mtime_ns == before  # reused as is


def test_prepare_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by"):
        hs.prepare(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_mfcc_stats_do_not_depend_on_the_file_rate(tmp_path: Path) -> None:
    """The same tone at 8 kHz and at 16 kHz gives nearly the same MFCC statistics (resampled to 8 kHz first), and
    another tone gives clearly different ones."""
    def tone(freq: float, rate: int) -> Path:
        t = np.arange(int(0.5 * rate)) / rate
        path = tmp_path / f"{freq}-{rate}.wav"
        sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), rate, subtype="PCM_16")
        return path

    a8, a16, b8 = hs.mfcc_stats(tone(440, 8000)), hs.mfcc_stats(tone(440, 16000)), hs.mfcc_stats(tone(1500, 8000))
    assert a8.shape == (40,)
    assert np.abs(a8[:20] - a16[:20]).max() < 0.1 * np.abs(a8[:20] - b8[:20]).max()
