"""`fusion-zoo predict --table`: every row of a table predicted, written as a CSV, bad rows named, not fatal."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from fusion_errors import DataError, InputError
from recipes.cli import main as cli_main
from recipes.predict_table import predict_table
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

#: the library's own small encoders (random weights, offline), so no test-only encoder enters the registry
TINY = {"text": "tiny-text", "image": "pixels", "audio": "mel-cnn"}


@pytest.fixture
def make_model() -> Callable[..., FusionModel]:
    """A tiny fused model over ``modalities``: ``make_model(task=...)`` and the other config fields."""

    def make(modalities: Sequence[str] = ("audio", "image", "text"), **kw: Any) -> FusionModel:
        torch.manual_seed(0)
        kw.setdefault("hidden_dim", 8)
        cfg = FusionModelConfig(encoders={m: {"name": TINY[m]} for m in modalities}, labels=("a", "b", "c"), **kw)
        return FusionModel(cfg).eval()

    return make


def _table(tmp_path: Path, raw: dict[str, list[Any]], text_column: str = "text") -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "wav").mkdir()
    rows = []
    for i in range(3):
        raw["image"][i].save(tmp_path / "img" / f"{i}.png")
        sf.write(tmp_path / "wav" / f"{i}.wav", raw["audio"][i][0], raw["audio"][i][1], subtype="FLOAT")
        rows.append({"id": f"r{i}", text_column: raw["text"][i], "image": f"img/{i}.png", "audio": f"wav/{i}.wav"})
    rows[1]["image"] = "img\\1.png"  # written on Windows
    rows.append({"id": "gone", text_column: "four", "image": "img/none.png", "audio": ""})  # a file that is missing
    rows.append({"id": "empty", text_column: "", "image": "", "audio": ""})  # nothing to predict from
    rows.append({"id": "text only", text_column: "five", "image": "", "audio": ""})
    path = tmp_path / "new.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_every_row_is_predicted_as_predict_would_and_bad_rows_say_why(make_model, raw, tmp_path: Path) -> None:
    model = make_model()
    table = _table(tmp_path, raw)
    summary = predict_table(model, table, tmp_path / "out.csv", batch_size=2, echo=lambda _: None)
    assert summary["rows"] == 6 and summary["predicted"] == 4 and summary["failed"] == 2
    got = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["id"] for r in got] == ["r0", "r1", "r2", "gone", "empty", "text only"]  # every row, in order
    # the same samples through model.predict, from the in-memory originals (the files hold the same pixels/samples)
    want = model.predict(text=raw["text"] + ["five"], image=raw["image"] + [None], audio=raw["audio"] + [None],
                         explain=False)
    for row, ref in zip([got[0], got[1], got[2], got[5]], want, strict=True):
        assert row["prediction"] == ref["label"] and row["error"] == ""
        for label, p in ref["probs"].items():
            assert float(row[f"prob_{label}"]) == pytest.approx(p, abs=2e-6)
        assert float(row["probability"]) == pytest.approx(ref["probs"][ref["label"]], abs=2e-6)
    gone = next(r for r in got if r["id"] == "gone")
    assert gone["prediction"] == "" and "none.png" in gone["error"] and "does not exist" in gone["error"]
    assert "every modality's cell is empty" in next(r for r in got if r["id"] == "empty")["error"]


def test_columns_by_usual_name_or_mapped(make_model, raw, tmp_path: Path) -> None:
    model = make_model(modalities=("image", "text"))
    table = _table(tmp_path, raw, text_column="question")  # the name fit also takes for text
    lines: list[str] = []
    summary = predict_table(model, table, tmp_path / "a.csv", echo=lines.append)
    assert summary["columns"] == {"image": "image", "text": "question"} and "text <- 'question'" in lines[0]
    mapped = predict_table(model, table, tmp_path / "b.csv", columns={"text": "id"}, echo=lambda _: None)
    assert mapped["columns"]["text"] == "id"
    assert (tmp_path / "a.csv").read_text() != (tmp_path / "b.csv").read_text()  # other texts, other predictions
    with pytest.raises(DataError, match="column 'nope' \\(for text\\) is not in the table"):
        predict_table(model, table, tmp_path / "c.csv", columns={"text": "nope"}, echo=lambda _: None)
    with pytest.raises(InputError, match=r"maps \['audio'\], which this model does not take"):
        predict_table(model, table, tmp_path / "c.csv", columns={"audio": "id"}, echo=lambda _: None)
    assert not (tmp_path / "c.csv").exists()


def test_the_cli_writes_the_csv_and_refuses_mixed_inputs(make_model, raw, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    table = _table(tmp_path, raw)
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", "--model", str(tmp_path / "model"), "--table", str(table), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and set(rows[0]) >= {"id", "prediction", "probability", "prob_a", "error"}
    assert "4 rows predicted, 2 failed" in capsys.readouterr().out
    assert cli_main(["predict", "--model", str(tmp_path / "model"), "--table", str(table), "--text", "x"]) == 2
    assert "either --table or" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(tmp_path / "model"), "--table", str(tmp_path / "no.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(tmp_path / "model"), "--table", str(table),
                     "--columns", json.dumps(["text"])]) == 2


def test_regression_and_multilabel_columns(make_model, raw, tmp_path: Path) -> None:
    table = _table(tmp_path, raw)
    reg = make_model(task="regression")
    predict_table(reg, table, tmp_path / "r.csv", echo=lambda _: None)
    row = next(csv.DictReader((tmp_path / "r.csv").open()))
    want = reg.predict(text=raw["text"][:1], image=raw["image"][:1], audio=raw["audio"][:1], explain=False)[0]
    assert {k for k in row if k.startswith("pred_")} == {f"pred_{k}" for k in want["values"]}
    assert np.allclose([float(row[f"pred_{k}"]) for k in want["values"]], list(want["values"].values()), atol=1e-5)
    multi = make_model(task="multilabel")
    predict_table(multi, table, tmp_path / "m.csv", echo=lambda _: None)
    row = next(csv.DictReader((tmp_path / "m.csv").open()))
    want = multi.predict(text=raw["text"][:1], image=raw["image"][:1], audio=raw["audio"][:1], explain=False)[0]
    assert row["prediction"] == ";".join(want["labels"]) and "probability" not in row


def test_the_tables_own_prediction_column_is_kept_apart_and_the_table_is_never_overwritten(make_model, raw,
                                                                                        tmp_path: Path) -> None:
    model = make_model(modalities=("text",))
    table = tmp_path / "t.csv"
    table.write_text("text,prediction,error\none,old,none\ntwo,older,\n")
    predict_table(model, table, tmp_path / "out.csv", echo=lambda _: None)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["input_prediction"] for r in rows] == ["old", "older"]
    assert [r["input_error"] for r in rows] == ["none", ""]
    want = model.predict(text=["one", "two"], explain=False)
    assert [r["prediction"] for r in rows] == [w["label"] for w in want] and [r["error"] for r in rows] == ["", ""]
    with pytest.raises(InputError, match="is the table itself"):
        predict_table(model, table, table, echo=lambda _: None)
    assert table.read_text().startswith("text,prediction,error")


def test_a_folder_of_images_is_predicted_file_by_file(make_model, raw, tmp_path: Path) -> None:
    model = make_model(modalities=("image",))
    photos = tmp_path / "photos"
    for i, cls in enumerate(["cat", "dog", "dog"]):
        (photos / "test" / cls).mkdir(parents=True, exist_ok=True)
        raw["image"][i].save(photos / "test" / cls / f"{i}.png")
    summary = predict_table(model, photos, tmp_path / "p.csv", echo=lambda _: None)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert summary["predicted"] == 3 and [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png"]
    assert [r["label"] for r in rows] == ["cat", "dog", "dog"]  # the class folders, kept to compare with
    want = model.predict(image=raw["image"], explain=False)
    assert [r["prediction"] for r in rows] == [w["label"] for w in want]
    (photos / "train.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="holds tables"):
        predict_table(model, photos, tmp_path / "q.csv", echo=lambda _: None)
