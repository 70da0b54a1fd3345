"""The shipped tridigits files load offline, hold what the docs promise and are checksum-guarded."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusion_errors import DataError
from recipes.tridigits.dataset import DATA_DIR, SPLITS, TRIDIGITS_LABELS, describe, load_tridigits


@pytest.fixture(scope="module")
def tri():
    return load_tridigits()


def test_every_split_loads_and_sizes_sum_to_sklearn_digits(tri):
    assert set(tri) == set(SPLITS)
    assert sum(len(tri[s]) for s in SPLITS) == 1797
    assert len(tri["train"]) > len(tri["test"]) > len(tri["validation"]) > 0
    ids = [i for s in SPLITS for i in tri[s]["sample_id"]]
    assert sorted(ids) == list(range(1797))


def test_single_split_and_unknown_split():
    val = load_tridigits("validation")
    assert val.features["label"].names == TRIDIGITS_LABELS
    with pytest.raises(DataError, match="no split 'dev'"):
        load_tridigits("dev")


def test_labels_in_range_and_clues_contain_label(tri):
    for split in SPLITS:
        labels, clues = tri[split]["label"], tri[split]["clue_digits"]
        assert all(0 <= y <= 9 for y in labels)
        assert all(y in c and len(c) >= 2 and len(set(c)) == len(c) for y, c in zip(labels, clues, strict=True))
        assert len(set(labels)) == 10
    texts = tri["train"]["text"]
    assert len(set(texts)) > 50  # many phrasings, not one sentence per digit


def test_images_decode_as_grayscale(tri):
    rows = tri["test"].select(range(5))
    for img in rows["image"]:
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (32, 32)
        assert np.asarray(img).std() > 0


def test_audio_decodes_at_16k_mono_and_is_not_silent(tri):
    for split in SPLITS:
        for blob in tri[split].select(range(3))["audio"]:
            wav, rate = sf.read(io.BytesIO(blob), dtype="float32")
            assert rate == 16000 and wav.ndim == 1
            assert 0.1 < len(wav) / rate < 3.0
            assert np.sqrt(np.mean(wav**2)) > 1e-3


def test_test_voices_are_held_out(tri):
    train_voices = set(tri["train"]["voice"]) | set(tri["validation"]["voice"])
    test_voices = set(tri["test"]["voice"])
    assert len(train_voices | test_voices) >= 8
    assert test_voices and not train_voices & test_voices


def test_describe_counts_match():
    info = describe()
    assert sum(v["rows"] for v in info.values()) == 1797
    assert sum(info["train"]["labels"].values()) == info["train"]["rows"]


def test_checksum_mismatch_raises_naming_file(tmp_path):
    for path in DATA_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    assert len(load_tridigits("validation", data_dir=tmp_path)) > 0
    with open(tmp_path / "validation.parquet", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match="validation.parquet.*tridigits.build"):
        load_tridigits("validation", data_dir=tmp_path)
    load_tridigits("train", data_dir=tmp_path)  # untouched splits still load


def test_missing_manifest_raises(tmp_path):
    shutil.copy(DATA_DIR / "test.parquet", tmp_path / "test.parquet")
    with pytest.raises(DataError, match="manifest"):
        load_tridigits("test", data_dir=tmp_path)
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{s}.parquet" for s in SPLITS}
