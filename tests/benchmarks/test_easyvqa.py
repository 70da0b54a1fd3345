"""The easy-VQA harness (benchmarks/easyvqa.py) and the fusion probe (benchmarks/fusion_probe.py).

The real easy-vqa package is replaced by a small fake with the same API (its images are generated here), so these
tests need neither the package nor pretrained weights.
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
easyvqa = importlib.import_module("benchmarks.easyvqa")
probe = importlib.import_module("benchmarks.fusion_probe")

from fusion_errors import DataError  # noqa: E402


def _fake_package(root: Path, n_train: int = 20, n_test: int = 5) -> types.ModuleType:
    """A module with easy_vqa's five functions over ``n_train``/``n_test`` images with 3 questions each."""
    paths: dict[str, dict[int, str]] = {}
    questions: dict[str, tuple[list[str], list[str], list[int]]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / split
        folder.mkdir(parents=True)
        paths[split] = {}
        texts, answers, ids = [], [], []
        for i in range(n):
            colour = ("red", "blue")[i % 2]
            Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
            paths[split][i] = str(folder / f"{i}.png")
            for q, a in (("what color is the shape?", colour), ("is there a red shape?", "yes" if i % 2 == 0 else
                                                                 "no"), ("is the shape, blue?", "no" if i % 2 == 0
                                                                         else "yes")):
                texts.append(q)
                answers.append(a)
                ids.append(i)
        questions[split] = (texts, answers, ids)
    mod = types.ModuleType("easy_vqa")
    mod.get_train_questions = lambda: questions["train"]
    mod.get_test_questions = lambda: questions["test"]
    mod.get_train_image_paths = lambda: dict(paths["train"])
    mod.get_test_image_paths = lambda: dict(paths["test"])
    mod.get_answers = lambda: ["red", "blue", "yes", "no"]
    return mod


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = _fake_package(tmp_path / "pkg")
    monkeypatch.setitem(sys.modules, "easy_vqa", mod)
    return mod


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_user_csvs_with_validation_carved_by_image(fake: types.ModuleType, tmp_path: Path) -> None:
    out = easyvqa.prepare(tmp_path / "data", val_fraction=0.25, seed=3)
    train, val, test = (_rows(out / f"{s}.csv") for s in ("train", "validation", "test"))
    assert list(train[0]) == ["image", "question", "answer"]
    assert (len(train), len(val), len(test)) == (15 * 3, 5 * 3, 5 * 3)  # 25% of 20 images, 3 questions each
    train_images, val_images = {r["image"] for r in train}, {r["image"] for r in val}
    assert not train_images & val_images and len(val_images) == 5
    assert {r["image"] for r in test} == {f"images/test/{i}.png" for i in range(5)}
    for r in train + val + test:  # relative paths that resolve against the folder, to the right picture
        with Image.open(out / r["image"]) as img:
            colour = "red" if img.getpixel((0, 0)) == (255, 0, 0) else "blue"
        if r["question"] == "what color is the shape?":
            assert r["answer"] == colour
    # the same seed carves the same images; another seed other ones
    again = easyvqa.prepare(tmp_path / "again", val_fraction=0.25, seed=3)
    assert {r["image"] for r in _rows(again / "validation.csv")} == val_images
    other = easyvqa.prepare(tmp_path / "other", val_fraction=0.25, seed=4)
    assert {r["image"] for r in _rows(other / "validation.csv")} != val_images


def test_prepare_reuses_its_folder_and_refuses_a_foreign_one(fake: types.ModuleType, tmp_path: Path) -> None:
    out = easyvqa.prepare(tmp_path / "data")
    stamp = (out / "train.csv").stat().st_mtime_ns
    assert easyvqa.prepare(tmp_path / "data") == out and (out / "train.csv").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by"):
        easyvqa.prepare(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_prepare_fails_on_a_broken_package_and_leaves_nothing_behind(fake: types.ModuleType, tmp_path: Path) -> None:
    train_paths = fake.get_train_image_paths()
    fake.get_train_image_paths = lambda: {**train_paths, 7: str(tmp_path / "gone.png")}  # a file that is missing
    with pytest.raises(DataError, match="reinstall"):
        easyvqa.prepare(tmp_path / "data")
    assert not any(tmp_path.glob("*data*"))  # neither the folder nor its partial build
    fake.get_test_image_paths = lambda: {}  # every test question now points at an image the package lacks
    with pytest.raises(DataError, match="not in the package"):
        easyvqa.prepare(tmp_path / "data")


def test_documented_command_maps_the_question_and_answer_columns() -> None:
    argv = easyvqa.fit_command("/d")
    assert argv[:4] == ["fusion-zoo", "fit", "--data.data_dir", "/d"]
    assert json.loads(argv[argv.index("--data.columns") + 1]) == {"text": "question", "label": "answer"}


def test_merge_results_keeps_other_keys_and_records_the_target(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"main_job_seconds": 100.0, "targets": {"main_job_seconds": {"op": "<=", "value": 300}},
                                "met": {"main_job_seconds": True}}))
    easyvqa.merge_results({"easyvqa_test_accuracy": 0.975, "easyvqa_seconds": 50.0}, path, easyvqa.TARGETS)
    doc = json.loads(path.read_text())
    assert doc["main_job_seconds"] == 100.0 and doc["met"]["main_job_seconds"] is True
    assert doc["easyvqa_test_accuracy"] == 0.975 and doc["met"]["easyvqa_test_accuracy"] is False
    assert doc["targets"]["easyvqa_test_accuracy"] == {"op": ">=", "value": 0.99}


def test_probe_reads_each_unique_question_and_image_once(fake: types.ModuleType, tmp_path: Path) -> None:
    out = easyvqa.prepare(tmp_path / "data", val_fraction=0.25)
    tables, texts, images, labels = probe.read_tables(out, {"text": "question", "image": "image", "label": "answer"})
    assert len(texts) == 3 and len(images) == 25 and labels == ["blue", "no", "red", "yes"]
    rows = _rows(out / "train.csv")
    tab = tables["train"]
    assert len(tab.label) == len(rows)
    for k in (0, 7, len(rows) - 1):
        assert texts[tab.text[k]] == rows[k]["question"]
        assert images[tab.image[k]] == str((out / rows[k]["image"]).resolve())
        assert labels[tab.label[k]] == rows[k]["answer"]


def test_probe_feature_fusion_learns_an_interaction_that_additive_models_cannot(tmp_path: Path) -> None:
    # label = XOR of a bit carried by the "question" and a bit carried by the "image": no sum of per-modality
    # decisions can get above 75%, an MLP over the concatenated vectors can get it all
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 6, generator=g)
    i = torch.randn(40, 10, generator=g)
    t_bit, i_bit = (t[:, 0] > 0).long(), (i[:, 0] > 0).long()

    def table(n: int, seed: int) -> probe.Table:
        gg = torch.Generator().manual_seed(seed)
        ti, ii = torch.randint(0, 8, (n,), generator=gg), torch.randint(0, 40, (n,), generator=gg)
        return probe.Table(ti, ii, t_bit[ti] ^ i_bit[ii])

    tables = {"train": table(2000, 1), "validation": table(400, 2), "test": table(400, 3)}
    hp = {**probe.BASE, "epochs": 15, "hidden": 32, "lr": 1e-2, "batch_size": 64}
    mlp = probe.train_probe("concat-mlp1", hp, t, i, tables, 2)
    assert mlp["test"] >= 0.97
    for additive in ("concat-linear", "late-mlp"):
        assert probe.train_probe(additive, hp, t, i, tables, 2)["test"] <= 0.80
    assert 1 <= mlp["best_epoch"] <= 15 and len(mlp["val_curve"]) == 15


def test_read_rows_shuffles_by_seed_and_names_prepare_when_missing(fake: types.ModuleType, tmp_path: Path) -> None:
    out = easyvqa.prepare(tmp_path / "data")
    plain = easyvqa.read_rows(out, "test")
    assert plain == _rows(out / "test.csv")
    shuffled = easyvqa.read_rows(out, "test", seed=0)
    assert shuffled != plain and sorted(map(str, shuffled)) == sorted(map(str, plain))  # same rows, new order
    assert easyvqa.read_rows(out, "test", seed=0) == shuffled
    with pytest.raises(DataError, match=r"nowhere/train\.csv is missing; run `python benchmarks/easyvqa.py prepare"):
        easyvqa.read_rows(tmp_path / "nowhere", "train")


def test_small_data_subsets_are_seeded_prefixes_of_the_prepared_splits(fake: types.ModuleType, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    small = importlib.import_module("benchmarks.small_data")
    monkeypatch.setattr(small, "SIZES", {"train": 10, "validation": 4, "test": 6})
    out = easyvqa.prepare(tmp_path / "data")
    files = small.prepare(out, train_rows=7)
    assert {s: p.name for s, p in files.items()} == {s: f"small7_{s}.csv" for s in ("train", "validation", "test")}
    for split, n in (("train", 7), ("validation", 4), ("test", 6)):
        rows = _rows(files[split])
        assert list(rows[0]) == ["image", "question", "answer"] and len(rows) == n
        assert rows == easyvqa.read_rows(out, split, seed=0)[:n]
        assert all((out / r["image"]).is_file() for r in rows)  # image paths still resolve next to the prepared CSVs
