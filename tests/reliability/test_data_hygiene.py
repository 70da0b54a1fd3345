"""Issue 14 (7): labels and data hygiene. Label whitespace, integer labels with empty cells, classes seen only in
validation/test, empty tables, invisible texts, a text column given to an image encoder, NaN cache entries and
temp files of killed saves."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

import encoders
from encoders.text_hf import check_texts
from fusion_errors import ConfigError, DataError, InputError
from recipes._columns import cell_problem, is_missing, resolve
from recipes.cache import FeatureCache, clean_stale_temps
from recipes.data import FusionDataModule
from recipes.formats import load_source
from zoo.config import FusionModelConfig
from zoo.model import FusionModel


def _csv(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def test_integer_labels_with_an_empty_cell_are_classes_and_the_row_is_named(tmp_path: Path) -> None:
    rows = [(f"t{i}", str(i % 2)) for i in range(10)]
    rows[4] = ("t4", "")  # pandas reads the column as float with a NaN
    dm = FusionDataModule(data_files=_csv(tmp_path / "d.csv", rows), cache_features=False, val_fraction=0.2,
                          test_fraction=0.2)
    assert dm.labels == ["0", "1"]  # was ['label'] -> "needs at least 2 labels, got ['label']"
    dm.attach(FusionModel(FusionModelConfig(encoders={"text": "tiny-text"}, labels=tuple(dm.labels), hidden_dim=8)))
    with pytest.raises(DataError, match="row 4: column 'label': the label is empty"):
        dm.setup(None)


def test_label_whitespace_is_stripped_with_a_warning_when_it_merges(tmp_path: Path) -> None:
    rows = [(f"t{i}", ["cat", "dog", "cat "][i % 3]) for i in range(12)]
    with pytest.warns(UserWarning, match="differ only in surrounding whitespace and are merged"):
        dm = FusionDataModule(data_files=_csv(tmp_path / "d.csv", rows), cache_features=False)
    assert dm.labels == ["cat", "dog"]  # was ['cat', 'cat ', 'dog']


def test_a_class_seen_only_in_test_is_an_error_unless_listed(tmp_path: Path) -> None:
    train = _csv(tmp_path / "train.csv", [(f"t{i}", "ab"[i % 2]) for i in range(8)])
    test = _csv(tmp_path / "test.csv", [("x", "a"), ("y", "bird")])
    files = {"train": train, "validation": train, "test": test}
    with pytest.raises(DataError, match=r"label\(s\) \['bird'\] .* appear in the test split but never in train"):
        FusionDataModule(data_files=files, cache_features=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FusionDataModule(data_files=files, labels=["a", "b", "bird"], cache_features=False).labels == [
            "a", "b", "bird"]


def test_a_zero_byte_csv_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)"):  # was DatasetGenerationError
        FusionDataModule(data_files=str(tmp_path / "empty.csv"))


def test_a_csv_that_is_not_utf8_is_named_with_the_byte_and_the_fix(tmp_path: Path) -> None:
    good = "text,label\nplain,a\nother,b\n"
    (tmp_path / "train.csv").write_text(good, encoding="utf-8")
    (tmp_path / "test.csv").write_bytes(("text,label\nfine,a\nnaïve café,b\n").encode("cp1252"))  # Excel's export
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    # "ï" is 0xef in cp1252, at offset 20 (11 + 7 + 2), line 3; the train file is fine and is not the one named
    with pytest.raises(DataError, match=r"test\.csv' is not UTF-8 text \(byte 0xef at offset 20, line 3\); re-save it "
                                        r"as UTF-8"):  # was "DatasetGenerationError: An error occurred ..."
        FusionDataModule(data_files=files)
    (tmp_path / "test.csv").write_text("\ufefftext,label\nfine,a\nnaïve café,b\n", encoding="utf-8")  # BOM
    loaded, _, _ = load_source("", files, None, None)  # UTF-8 with a byte-order mark reads, the mark dropped
    assert loaded["test"].column_names == ["text", "label"] and loaded["test"]["text"][1] == "naïve café"


def test_semicolon_tables_and_windows_paths_from_spreadsheets_read(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(b"x")
    (tmp_path / "t.csv").write_text("text;image;label\nsoft fur;images\\cat.png;cat\nloud;images\\cat.png;dog\n")
    loaded, base, _ = load_source("", str(tmp_path / "t.csv"), None, None)
    assert loaded["train"].column_names == ["text", "image", "label"]  # was one column named "text;image;label"
    assert loaded["train"]["text"] == ["soft fur", "loud"]
    assert resolve(loaded["train"]["image"][0], base) == str(tmp_path / "images" / "cat.png")
    (tmp_path / "images\\dog.png").write_bytes(b"y")  # on Linux a backslash may be part of a real file name
    assert resolve("images\\dog.png", tmp_path) == str(tmp_path / "images\\dog.png")
    assert resolve("images\\none.png", tmp_path) == str(tmp_path / "images\\none.png")  # absent: reported as is
    (tmp_path / "c.csv").write_text("text,label\n1;2,a\n")  # a comma header stays comma-separated
    assert load_source("", str(tmp_path / "c.csv"), None, None)[0]["train"]["text"] == ["1;2"]


@pytest.mark.parametrize("text", ["\x00\x00", "\u200b", "\ufeff\u200d \t", "\x1b\x07"])
def test_control_or_zero_width_only_texts_are_empty(text: str) -> None:
    assert is_missing(text)
    with pytest.raises(InputError, match="text item 0 is empty"):
        check_texts([text])
    assert check_texts(["a\u200bb"]) == ["a\u200bb"]  # visible text around them stays


def test_a_text_column_given_to_an_image_encoder_says_so(tmp_path: Path) -> None:
    problem = cell_problem("image", str(tmp_path / "hi"))  # was: "image file '.../hi' does not exist"
    assert problem is not None and "is a text column given to the image encoder?" in problem
    assert "does not exist" in cell_problem("image", str(tmp_path / "missing.png"))


def test_an_encoder_of_the_wrong_modality_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    model = FusionModel(FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8))
    folder = model.save_pretrained(tmp_path / "ck")
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["encoders"]["text"]["name"] = "tiny-image"
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="'tiny-image', which encodes image, not text"):
        FusionModel.from_pretrained(folder)


def test_a_cache_entry_full_of_nan_is_recomputed_with_a_warning(tmp_path: Path) -> None:
    encoder = encoders.create_encoder("tiny-text")
    with torch.no_grad():
        next(iter(encoder.parameters())).fill_(float("nan"))  # an encoder whose features are NaN
    rows = datasets.Dataset.from_dict({"text": ["one", "two", None]})
    cache = FeatureCache(tmp_path, memory=False)
    with pytest.warns(UserWarning, match="hold NaN/inf values"):  # checked once, while writing
        _, stats = cache.get_or_compute(encoder, rows, "text")
    assert json.loads((cache.path(stats.key) / "meta.json").read_text())["finite"] is False
    with pytest.warns(UserWarning, match="holds NaN/inf features"):
        _, stats = cache.get_or_compute(encoder, rows, "text")
    assert stats.source == "computed"  # was "disk": NaN features served, the loss blamed the learning rate


def test_stale_temp_files_of_killed_saves_are_cleaned_on_start(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # a process that has exited: its temp files are orphans
    dead.wait()
    stale = [tmp_path / f".abc.safetensors.{dead.pid}.123456.tmp", tmp_path / f".last.ckpt.{dead.pid}-0a1b2c3d.tmp",
             tmp_path / f".abc.features.{dead.pid}.123457.tmp"]
    live = tmp_path / f".metrics.json.{os.getpid()}-0a1b2c3d.tmp"
    keep = [live, tmp_path / "entry.safetensors", tmp_path / ".hidden.tmp"]
    for p in [*stale[:2], *keep]:
        p.write_bytes(b"x")
    stale[2].mkdir()  # a killed writer's half-written entry folder
    (stale[2] / "shard-00000.pooled.npy").write_bytes(b"x")
    FeatureCache(tmp_path)  # the cache cleans its folder when opened
    assert [p.exists() for p in stale] == [False, False, False]
    assert all(p.exists() for p in keep)
    assert clean_stale_temps(tmp_path / "no-such-folder") == 0


def test_a_shared_cache_keeps_another_machines_temp_files_until_they_are_a_day_old(tmp_path: Path) -> None:
    """Issue 31: on a folder several machines share, a process id of another machine means nothing here; its
    writer's temp folder (an entry being encoded) must survive this machine's cleanup."""
    import time

    from fusion_common.atomic import HOST_TAG, temp_name
    from recipes import cache

    other = "ffffffff" if HOST_TAG != "ffffffff" else "00000000"
    theirs = tmp_path / f".abc.features.{other}-999999999-0a1b2c3d.tmp"  # no such pid here
    theirs.mkdir()
    old = tmp_path / f".def.features.{other}-1-0a1b2c3d.tmp"
    old.mkdir()
    day = time.time() - cache.OTHER_HOST_STALE_SECONDS - 60
    os.utime(old, (day, day))
    mine_dead = tmp_path / temp_name("x.json").replace(f"-{os.getpid()}-", "-999999999-")
    mine_live = tmp_path / temp_name("y.json")
    for p in (mine_dead, mine_live):
        p.write_bytes(b"x")
    assert mine_live.name.startswith(".y.json." + HOST_TAG)
    assert clean_stale_temps(tmp_path) == 2
    assert theirs.exists() and mine_live.exists() and not old.exists() and not mine_dead.exists()


def test_a_modality_column_with_no_usable_value_is_an_error_or_a_warning_with_skip(tmp_path: Path) -> None:
    """Issue 30 (5): a table whose text cells are all empty trained silently on missing-modality embeddings."""
    rows = [("", "ab"[i % 2]) for i in range(10)]
    model = FusionModel(FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8))
    dm = FusionDataModule(data_files=_csv(tmp_path / "d.csv", rows), cache_features=False, val_fraction=0.2,
                          test_fraction=0.2).attach(model)
    with pytest.raises(DataError, match=r"column 'text' \(the text column\) is empty in every row of split .*"
                                        r"--data.on_bad_rows skip trains without it"):
        dm.setup("fit")
    dm = FusionDataModule(data_files=_csv(tmp_path / "d.csv", rows), cache_features=False, val_fraction=0.2,
                          test_fraction=0.2, on_bad_rows="skip").attach(model)
    with pytest.warns(UserWarning, match=r"column 'text' \(the text column\) is empty in every row.*training with "
                                         "text missing in every row"):
        dm.setup("fit")


def test_an_encoder_of_the_wrong_modality_is_refused_at_fit_naming_encoder_modality_and_column(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 30 (6): ``{"image": "tiny-text"}`` read image paths as text, and the saved model failed to load."""
    from recipes import cli

    table = _csv(tmp_path / "d.csv", [(f"t{i}", "ab"[i % 2]) for i in range(10)])
    code = cli.main(["fit", "--data.data_files", table, "--data.columns", '{"image": "img_path"}',
                     "--model.encoders", '{"image": "tiny-text"}', "--trainer.default_root_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "gives the image column 'img_path' the encoder 'tiny-text', which encodes text, not image" in err
    with pytest.raises(ConfigError, match="encoders.image is 'tiny-text', which encodes text, not image"):
        FusionModelConfig(encoders={"image": "tiny-text"}, labels=("a", "b"))  # refused before anything is built


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_a_full_disk_while_writing_the_feature_cache_is_one_line_and_leaves_the_cache_consistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """Issue 30 (7): disk full while writing the feature cache ended in ``SafetensorError: No space left on
    device``; now one line names the folder and the space needed, and no partial entry stays behind."""
    import errno

    from safetensors import SafetensorError

    from recipes import feature_store

    encoder = encoders.create_encoder("tiny-text")
    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(600)]})
    cache = FeatureCache(tmp_path / "cache", memory=False)
    real, calls = feature_store._save_pieces, []

    def full(path: Path, *args: Any) -> Any:  # shards are written piece by piece (feature_store._save_pieces)
        calls.append(path)
        if len(calls) > 1:  # the first shard file fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device") if failure == "oserror" else \
                SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
        return real(path, *args)

    monkeypatch.setattr(feature_store, "_save_pieces", full)
    monkeypatch.setattr(feature_store, "SHARD_BYTES", 4 * encoder.embed_dim * 300)  # two shards of 300 rows
    with pytest.raises(DataError, match=rf"no space left on the device of the feature cache {tmp_path / 'cache'} "
                                        r"while writing train/text: the entry needs about [\d,]+ MiB") as e:
        cache.get_or_compute(encoder, rows, "text", store_tokens=False)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "cache").iterdir()) in ([], [tmp_path / "cache" / "row-checks.json"])  # no partial entry
    monkeypatch.setattr(feature_store, "_save_pieces", real)
    out, stats = cache.get_or_compute(encoder, rows, "text", store_tokens=False)  # space again: written whole
    assert stats.source == "computed" and out.batch_size == 600
