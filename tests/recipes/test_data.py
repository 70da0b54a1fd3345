"""FusionDataModule on a user-style local dataset: PNG + WAV files and a CSV table, tiny encoders."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from encoders import ModalityOutput, create_encoder
from fusion_errors import DataError
from recipes.cache import FeatureCache
from recipes.data import FusionDataModule
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

LABELS = ("bird", "cat", "dog")
N = 12
COLUMNS = {"image": "img_path", "audio": "wav_path", "text": "caption", "label": "animal"}


def write_table(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("animals")
    (root / "img").mkdir()
    (root / "wav").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        t = np.arange(int(16000 * (0.2 + 0.02 * i))) / 16000
        sf.write(root / "wav" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t), 16000)
        rows.append({"caption": f"animal number {i}", "img_path": f"img/{i}.png", "wav_path": f"wav/{i}.wav",
                     "animal": LABELS[i % 3]})
    (root / "img" / "broken.png").write_bytes(b"this is not a png")
    write_table(root / "data.csv", rows)
    return root, rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"text": "tiny-text", "image": "tiny-image",
                                      "audio": {"name": "mel-cnn", "finetune": "frozen"}},
                            labels=LABELS, stage="early", fuse_tokens=True, hidden_dim=32)
    return FusionModel(cfg).eval()


def make(folder, tmp_path, rows=None, **kwargs):
    root, base_rows = folder
    csv_path = write_table(tmp_path / "table.csv", rows) if rows else str(root / "data.csv")
    if rows:  # a table elsewhere: its relative paths are taken from data_dir
        kwargs.setdefault("data_dir", str(root))
    options = {"columns": COLUMNS, "batch_size": 4, "cache_features": False, "cache_dir": str(tmp_path / "cache"),
               "val_fraction": 0.25, "test_fraction": 0.25}
    return FusionDataModule(data_files=csv_path, **{**options, **kwargs})


def test_local_csv_gives_batches_of_the_right_shapes_with_a_seeded_split(folder, tmp_path, model):
    dm = make(folder, tmp_path).attach(model)
    assert dm.labels == list(LABELS) and dm.dataset is None
    dm.setup(None)
    sizes = {r: len(dm._checked[r].rows) for r in ("train", "validation", "test")}
    assert sizes == {"train": 6, "validation": 3, "test": 3}
    ids = np.concatenate([dm._checked[r].row_ids for r in ("train", "validation", "test")])
    assert sorted(ids.tolist()) == list(range(N))  # disjoint, complete
    same = make(folder, tmp_path).attach(model)
    same.setup("test")
    assert same._checked["test"].row_ids.tolist() == dm._checked["test"].row_ids.tolist()
    other = make(folder, tmp_path, seed=1).attach(model)
    other.setup("test")
    assert other._checked["test"].row_ids.tolist() != dm._checked["test"].row_ids.tolist()
    batch = next(iter(dm.val_dataloader()))
    inputs = batch["inputs"]
    assert inputs["image"]["pixel_values"].shape == (3, 3, 32, 32)
    assert inputs["audio"]["waveform"].shape[0] == 3 and inputs["text"]["input_ids"].shape[0] == 3
    assert all(bool(x["present"].all()) for x in inputs.values())
    expected = [LABELS.index(LABELS[i % 3]) for i in batch["index"].tolist()]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == expected
    assert model(inputs).logits.shape == (3, 3)


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_and_parquet_tables(folder, tmp_path, model, fmt):
    import datasets

    root, rows = folder
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"table.{'jsonl' if fmt == 'json' else fmt}"
    table.to_json(path) if fmt == "json" else table.to_parquet(path)
    dm = FusionDataModule(data_files=str(path), data_dir=str(root), columns=COLUMNS, cache_features=False,
                          batch_size=4).attach(model)
    dm.setup("fit")
    assert dm.labels == list(LABELS)
    assert next(iter(dm.train_dataloader()))["inputs"]["image"]["present"].all()


def test_missing_column_names_the_column_and_the_flag(folder, tmp_path, model):
    dm = make(folder, tmp_path, columns={**COLUMNS, "image": "picture"}).attach(model)
    with pytest.raises(DataError, match=r"'picture'.*available columns: \[.*'img_path'.*--data\.columns"):
        dm.setup("fit")
    with pytest.raises(DataError, match=r"'label'.*--data\.columns"):
        make(folder, tmp_path, columns={k: v for k, v in COLUMNS.items() if k != "label"})


def test_label_outside_the_label_set_names_the_row(folder, tmp_path, model):
    rows = [dict(r) for r in folder[1]]
    rows[5]["animal"] = "fish"
    dm = make(folder, tmp_path, rows, labels=list(LABELS)).attach(model)
    with pytest.raises(DataError, match=r"row 5: column 'animal': label 'fish' is not in the label set"):
        dm.setup(None)


def test_unreadable_files_raise_naming_the_path_or_are_skipped_and_counted(folder, tmp_path, model):
    rows = [dict(r) for r in folder[1]]
    rows[3]["img_path"] = "img/broken.png"
    rows[7]["wav_path"] = "wav/gone.wav"
    with pytest.raises(DataError, match=r"row 3: column 'img_path': image '.*broken\.png' is not readable"):
        make(folder, tmp_path, rows, val_fraction=0.0, test_fraction=0.0,
             splits={"train": "train", "validation": "train", "test": "train"}).attach(model).setup("fit")
    dm = make(folder, tmp_path, rows, on_bad_rows="skip", splits={"train": "train", "validation": "train",
                                                                  "test": "train"}).attach(model)
    dm.setup(None)
    assert dm.bad_rows == {"train": 2, "validation": 2, "test": 2}
    ids = {i for b in dm.test_dataloader() for i in b["index"].tolist()}
    assert ids == set(range(N)) - {3, 7}


def test_empty_cells_are_missing_modalities(folder, tmp_path, model):
    rows = [dict(r) for r in folder[1]]
    rows[1]["caption"], rows[2]["wav_path"], rows[4]["img_path"] = "", "", ""
    splits = {"train": "train", "validation": "train", "test": "train"}
    dm = make(folder, tmp_path, rows, splits=splits, batch_size=N).attach(model)
    inputs = next(iter(dm.test_dataloader()))["inputs"]
    assert inputs["text"]["present"].tolist() == [i != 1 for i in range(N)]
    assert inputs["audio"]["present"].tolist() == [i != 2 for i in range(N)]
    assert inputs["image"]["present"].tolist() == [i != 4 for i in range(N)]
    cached = make(folder, tmp_path, rows, splits=splits, batch_size=N, cache_features=True).attach(model)
    feats = next(iter(cached.test_dataloader()))["inputs"]
    assert feats["text"].present.tolist() == inputs["text"]["present"].tolist()
    assert not feats["audio"].mask[2].any() and torch.equal(feats["image"].pooled[4], torch.zeros(256))


def test_cached_batches_equal_encoder_outputs_and_never_touch_the_encoders(folder, tmp_path, model, monkeypatch):
    FeatureCache.clear_memory()
    raw = make(folder, tmp_path).attach(model)
    dm = make(folder, tmp_path, cache_features=True).attach(model)
    dm.setup(None)
    assert len(list((tmp_path / "cache").glob("*.features"))) == 9  # 3 modalities x 3 splits
    for cached, plain in zip(dm.val_dataloader(), raw.val_dataloader(), strict=True):
        assert torch.equal(cached["index"], plain["index"]) and torch.equal(cached["labels"], plain["labels"])
        with torch.no_grad():
            direct = model.encode(plain["inputs"])
        for m, f in direct.items():
            c = cached["inputs"][m]
            assert isinstance(c, ModalityOutput) and c.tokens.shape == f.tokens.shape, m
            assert torch.equal(c.mask, f.mask) and torch.allclose(c.pooled, f.pooled, atol=1e-5), m
            assert torch.allclose(c.tokens * c.mask[..., None], f.tokens * f.mask[..., None], atol=1e-5), m
    for enc in model.encoders.values():
        monkeypatch.setattr(enc, "forward", lambda *a, **k: pytest.fail("an encoder ran on cached features"))
    batch = next(iter(dm.train_dataloader()))
    assert model(batch["inputs"]).logits.shape == (4, 3)
    FeatureCache.clear_memory()
    again = make(folder, tmp_path, cache_features=True).attach(model)
    again.setup("fit")  # a fresh process would read the files: hits, the encoders still untouched
    assert torch.equal(next(iter(again.val_dataloader()))["inputs"]["text"].pooled,
                       next(iter(dm.val_dataloader()))["inputs"]["text"].pooled)


def test_a_trainable_encoder_runs_while_the_frozen_ones_come_from_the_cache(folder, tmp_path, model, monkeypatch):
    FeatureCache.clear_memory()
    torch.manual_seed(0)
    cfg = model.config.replace(encoders={**model.config.encoders, "image": {"name": "tiny-image", "finetune": "full"}})
    mixed = FusionModel(cfg, encoders={**dict(model.encoders), "image": create_encoder("tiny-image", finetune="full")})
    dm = make(folder, tmp_path, cache_features=True).attach(mixed)
    dm.setup("fit")
    for m in ("audio", "text"):
        monkeypatch.setattr(mixed.encoders[m], "forward", lambda *a, **k: pytest.fail("a frozen encoder ran"))
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["inputs"]["text"], ModalityOutput) and isinstance(batch["inputs"]["audio"], ModalityOutput)
    assert isinstance(batch["inputs"]["image"], dict)  # preprocessed pixels: the trainable encoder runs each step
    out = mixed(batch["inputs"])
    out.logits.sum().backward()
    assert any(p.grad is not None for p in mixed.encoders["image"].parameters())
    assert not dm._use_cache(mixed) and dm._cached_modalities(mixed) == ["audio", "text"]


def test_late_stage_caches_pooled_features_only(folder, tmp_path, model):
    late = FusionModel(model.config.replace(stage="late"), encoders=dict(model.encoders))
    dm = make(folder, tmp_path, cache_features=True).attach(late)
    inputs = next(iter(dm.val_dataloader()))["inputs"]
    assert all(f.tokens.shape[1] == 1 for f in inputs.values())
    assert late(inputs).logits.shape == (3, 3)


def test_metadata_folder_and_audiofolder(folder, tmp_path, model):
    root, rows = folder
    write_table(root / "metadata.csv", rows)
    try:
        dm = FusionDataModule(data_dir=str(root), columns=COLUMNS, cache_features=False, batch_size=4)
        assert dm.labels == list(LABELS) and len(dm._parts["train"][0]) == 10
    finally:
        (root / "metadata.csv").unlink()
    for label in ("low", "high"):
        (tmp_path / "sounds" / label).mkdir(parents=True)
        for i in range(4):
            sf.write(tmp_path / "sounds" / label / f"{i}.wav", np.zeros(3200) + (0.1 if label == "high" else 0), 16000)
    audio_only = FusionModel(model.config.replace(encoders={"audio": "mel-cnn"}, labels=("high", "low")),
                             encoders={"audio": model.encoders["audio"]})
    dm = FusionDataModule(data_dir=str(tmp_path / "sounds"), data_format="audiofolder", cache_features=False,
                          val_fraction=0.25, test_fraction=0.25, batch_size=8).attach(audio_only)
    assert dm.labels == ["high", "low"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"]["audio"]["waveform"].shape == (4, 3200)


def test_bad_arguments_and_sources_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="not roles"):
        FusionDataModule(columns={"video": "v"})
    with pytest.raises(DataError, match="--data.data_files"):
        FusionDataModule(dataset="no-such-user/no-such-dataset-xyz")
    (tmp_path / "t.txt").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="--data.data_format"):
        FusionDataModule(data_files=str(tmp_path / "t.txt"))
    header_only = tmp_path / "val.csv"
    header_only.write_text("text,label\n")
    (tmp_path / "train.csv").write_text("text,label\nhello,a\nworld,b\nagain,a\n")
    with pytest.raises(DataError, match="is empty.*validation.*every split needs rows"):
        FusionDataModule(data_files={"train": str(tmp_path / "train.csv"), "validation": str(header_only)})


def test_tridigits_default_with_max_samples(model):
    dm = FusionDataModule(max_samples=6, cache_features=False, batch_size=6)
    assert dm.dataset == "tridigits" and dm.labels == [str(d) for d in range(10)]
    assert all(len(ds) == 6 for ds, _, _ in dm._parts.values())


def test_multilabel_and_regression_labels():
    import datasets

    from recipes._columns import LabelEncoder, infer_labels

    tags = datasets.Dataset.from_dict({"tags": [["b", "a"], ["c"], []]})
    assert infer_labels([tags], "tags") == ["a", "b", "c"]
    multi, problems = LabelEncoder(["a", "b", "c"], "multilabel", tags.features["tags"]).encode([["b", "a"], ["d"]])
    assert multi[0].tolist() == [1.0, 1.0, 0.0] and list(problems) == [1]
    assert "['d']" in problems[1]
    score = datasets.Dataset.from_dict({"score": [0.5, 2.0]})
    assert infer_labels([score], "score") == ["score"]
    values, problems = LabelEncoder(["score"], "regression", score.features["score"]).encode([0.5, float("nan"), 2])
    assert values[:, 0].tolist() == [0.5, 0.0, 2.0] and list(problems) == [1]


def test_modalities_and_usual_column_names_come_from_the_table(folder, tmp_path):
    root, base_rows = folder
    rows = [{"question": r["caption"], "img_path": r["img_path"], "answer": r["animal"]} for r in base_rows]
    table = write_table(tmp_path / "qa.csv", rows)
    dm = FusionDataModule(data_files=table, data_dir=str(root), columns={"image": "img_path"}, cache_features=False)
    assert dm.modalities == ["image", "text"]  # no audio column: an image+text model
    assert dm.columns["text"] == "question" and dm.columns["label"] == "answer"
    assert dm.labels == list(LABELS)
    audio_image = [{"image": r["img_path"], "audio": r["wav_path"], "label": r["animal"]} for r in base_rows]
    dm = FusionDataModule(data_files=write_table(tmp_path / "ai.csv", audio_image), data_dir=str(root),
                          cache_features=False)
    assert dm.modalities == ["audio", "image"]


def test_a_modality_empty_in_every_training_row_is_an_error_naming_the_column(folder, tmp_path, model):
    rows = [{**r, "caption": ""} for r in folder[1]]
    dm = make(folder, tmp_path, rows).attach(model)
    with pytest.raises(DataError, match=r"column 'caption' \(the text column\) is empty in every row.*--data.columns"):
        dm.setup("fit")



def test_a_negative_checkpoint_interval_is_one_line_exit_2(tmp_path, capsys) -> None:
    from recipes import cli

    code = cli.main(["fit", "--checkpoint.every_n_train_steps", "-1", "--trainer.default_root_dir", str(tmp_path),
                     "--model.encoders", '{"text": "tiny-text"}'])
    assert code == 2 and "--checkpoint.every_n_train_steps -1 must be >= 0" in capsys.readouterr().err


def test_a_warm_run_does_not_reopen_files_that_passed_and_a_changed_file_is_checked_again(folder, tmp_path, model,
                                                                                        monkeypatch):
    from recipes import _row_checks

    opened = []
    real = _row_checks.cell_problem

    def counted(m, v):
        if m != "text":
            opened.append(v)
        return real(m, v)

    monkeypatch.setattr(_row_checks, "cell_problem", counted)
    make(folder, tmp_path).attach(model).setup(None)
    assert len(opened) == 2 * N  # every image and audio file, once
    assert (tmp_path / "cache" / "row-checks.json").is_file()
    opened.clear()
    warm = make(folder, tmp_path).attach(model)
    warm.setup(None)
    assert opened == [] and warm.bad_rows == {"train": 0, "validation": 0, "test": 0}
    image = folder[0] / "img" / "0.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file: checked again
    try:
        make(folder, tmp_path).attach(model).setup(None)
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert opened == [str(image)]
    opened.clear()
    (tmp_path / "cache" / "row-checks.json").write_text("{not json")  # a corrupt store is ignored and rebuilt
    make(folder, tmp_path).attach(model).setup(None)
    assert len(opened) == 2 * N
    assert len(json.loads((tmp_path / "cache" / "row-checks.json").read_text())["good"]) == 2 * N


def test_a_bad_file_is_reported_on_every_run(folder, tmp_path, model):
    root, base_rows = folder
    rows = [dict(r) for r in base_rows]
    rows[1]["img_path"] = "img/broken.png"
    for _ in range(2):  # the second run uses the stored checks of the good files; the bad one is checked again
        with pytest.raises(DataError, match=r"row 1: column 'img_path': image .*broken.png.* is not readable"):
            make(folder, tmp_path, rows, val_fraction=0.0, test_fraction=0.0).attach(model).setup("fit")


def test_a_class_named_nan_or_na_is_a_label_and_only_an_empty_cell_is_missing(tmp_path) -> None:
    """Issue 30 (13): pandas read "NaN" (and "NA", "null", ...) in a CSV as a missing value."""
    from recipes.formats import load_source

    (tmp_path / "t.csv").write_text("text,label\nhello,NaN\n,NA\nworld,null\nx,\n")
    splits, _, _ = load_source(str(tmp_path / "t.csv"), None, None, None)
    assert list(splits["train"]["label"]) == ["NaN", "NA", "null", None]
    assert list(splits["train"]["text"]) == ["hello", None, "world", "x"]
