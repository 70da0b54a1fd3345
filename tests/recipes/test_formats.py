"""Data formats (recipes/formats): one contract test over every registered format, and a new format registered by
one function working as ``--data.data_format NAME`` in ``fusion-zoo fit``.

A format registered without a sample below fails the contract test: its sample is the format's test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusion_errors import DataError, RegistryError
from recipes import cli, formats
from recipes.data import FusionDataModule
from zoo.model import FusionModel

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [("a red square", "a"), ("a blue circle", "b"), ("green", "a"), ("a dot", "b"), ("two", "a"), ("six", "b")]
Sample = tuple[dict[str, Any], str, list[str]]  # (FusionDataModule data arguments, the modality read, labels)


def _rows() -> dict[str, list[str]]:
    return {"text": [t for t, _ in TEXTS], "label": [y for _, y in TEXTS]}


def _csv(tmp: Path) -> Sample:
    (tmp / "t.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in TEXTS))
    return {"data_files": str(tmp / "t.tsv")}, "text", ["a", "b"]


def _json(tmp: Path) -> Sample:
    (tmp / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in TEXTS))
    return {"data_files": str(tmp / "t.jsonl")}, "text", ["a", "b"]


def _parquet(tmp: Path) -> Sample:
    datasets.Dataset.from_dict(_rows()).to_parquet(str(tmp / "t.parquet"))
    return {"data_files": str(tmp / "t.parquet")}, "text", ["a", "b"]


def _tablefolder(tmp: Path) -> Sample:
    (tmp / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in TEXTS[:4]))
    (tmp / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in TEXTS[4:]))
    return {"data_dir": str(tmp)}, "text", ["a", "b"]


def _imagefolder(tmp: Path) -> Sample:
    for i in range(6):
        (tmp / "cat dog".split()[i % 2]).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp / "cat dog".split()[i % 2] / f"{i}.png")
    return {"data_dir": str(tmp)}, "image", ["cat", "dog"]


def _audiofolder(tmp: Path) -> Sample:
    for i in range(6):
        (tmp / "low high".split()[i % 2]).mkdir(exist_ok=True)
        sf.write(tmp / "low high".split()[i % 2] / f"{i}.wav", np.full(800, 0.01 * i), 16000)
    return {"data_dir": str(tmp)}, "audio", ["high", "low"]


def _hub(tmp: Path) -> Sample:  # a folder laid out as a hub dataset repository: read offline by load_dataset
    (tmp / "data").mkdir()
    datasets.Dataset.from_dict(_rows()).to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
    return {"dataset": str(tmp)}, "text", ["a", "b"]


SAMPLES: dict[str, Callable[[Path], Sample]] = {
    "csv": _csv, "json": _json, "parquet": _parquet, "tablefolder": _tablefolder, "imagefolder": _imagefolder,
    "audiofolder": _audiofolder, "hub": _hub,
}


@pytest.mark.parametrize("name", formats.list_formats())
def test_every_format_reads_its_sample_through_the_data_module(name: str, tmp_path: Path) -> None:
    assert name in SAMPLES, f"format {name!r} has no sample: add a writer to SAMPLES in {__file__}"
    data, modality, labels = SAMPLES[name](tmp_path)
    dm = FusionDataModule(**data, data_format=name, cache_features=False, val_fraction=0.2, test_fraction=0.2)
    assert dm.modalities == [modality] and dm.labels == labels
    assert set(dm._parts) == {"train", "validation", "test"}  # found by name or carved from train
    assert sum(len(ds) for ds, _, _ in dm._parts.values()) == 6  # every row, once
    fmt = formats.get_format(name)
    source = formats.locate(data.get("dataset", ""), data.get("data_files"), data.get("data_dir"))
    if fmt.reads != "name":  # a file or folder is claimed by its format without --data.data_format
        assert formats.pick_format(source).name == name
        assert FusionDataModule(**data, cache_features=False).labels == labels


@pytest.mark.parametrize("name", formats.list_formats())
def test_every_format_streams_the_rows_it_reads(name: str, tmp_path: Path) -> None:
    """``--data.streaming`` reads the same rows: lazily where the format streams, converted where it does not."""
    data, _, _ = SAMPLES[name](tmp_path)
    args = (data.get("dataset", ""), data.get("data_files"), name, data.get("data_dir"))
    whole, base, _ = formats.load_source(*args)
    streamed, streamed_base, _ = formats.load_stream(*args)
    assert set(streamed) == set(whole) and streamed_base == base
    for split, (rows, total) in streamed.items():
        assert [dict(r) for r in rows] == [dict(r) for r in whole[split]]
        assert total in (None, len(whole[split]))
    assert all(isinstance(rows, datasets.IterableDataset) for rows, _ in streamed.values())


def test_a_name_that_is_nothing_local_is_a_hub_dataset() -> None:
    assert formats.pick_format(formats.locate("user/some-dataset", None, None)).name == "hub"


def test_an_unknown_format_lists_the_registered_ones(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label\nx,a\n")
    with pytest.raises(DataError, match=r"--data.data_format 'cvs' is not a registered format \(did you mean 'csv'"
                                         r"\?\); use one of audiofolder, csv, hub, .*register_format"):
        FusionDataModule(data_files=str(tmp_path / "t.csv"), data_format="cvs")
    with pytest.raises(DataError, match="data_format='imagefolder' needs --data.data_dir"):
        FusionDataModule(data_files=str(tmp_path / "t.csv"), data_format="imagefolder")
    with pytest.raises(DataError, match=r"--data.data_files \{\} names no file"):
        FusionDataModule(data_files={})


def test_a_format_registers_once_and_says_what_it_claims() -> None:
    with pytest.raises(RegistryError, match="already registered"):
        formats.register_format("csv", suffixes=(".csv",))(lambda source: datasets.DatasetDict())
    with pytest.raises(RegistryError, match="give the suffixes it claims"):
        formats.register_format("no-suffix")(lambda source: datasets.DatasetDict())


def test_a_format_that_streams_without_saying_so_is_refused_unless_streaming(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    formats.register_format("lazy-only", suffixes=(".lazy",))(
        lambda source: datasets.IterableDatasetDict({"train": rows.to_iterable_dataset()}))
    (tmp_path / "t.lazy").write_text("rows are made by the format\n")
    try:
        with pytest.raises(DataError, match="loaded as IterableDatasetDict without --data.streaming"):
            formats.load_source("", str(tmp_path / "t.lazy"), None, None)
        streamed, _, _ = formats.load_stream("", str(tmp_path / "t.lazy"), None, None)
        assert list(streamed) == ["train"] and streamed["train"][1] is None  # its length is not stated
        assert [r["text"] for r in streamed["train"][0]] == ["a", "b"]
    finally:
        formats._REGISTRY._entries.pop("lazy-only")
        formats._FORMATS.pop("lazy-only")


def test_a_format_error_of_its_own_becomes_one_line_naming_the_format(tmp_path: Path,
                                                                      textfolder: formats.DataFormat) -> None:
    (tmp_path / "pos").mkdir()
    (tmp_path / "pos" / "1.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match=r"cannot read '.*' as textfolder \(UnicodeDecodeError: .*--data.data_format"):
        FusionDataModule(data_dir=str(tmp_path), data_format="textfolder")


def _documented_example() -> tuple[str, str]:
    """The two code blocks of docs/data.md, "Adding a data source": the format, and its sample writer."""
    text = (ROOT / "docs" / "data.md").read_text().split("## Adding a data source", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2, "docs/data.md, Adding a data source: expected the format and its test, two blocks"
    return blocks[0], blocks[1]


@pytest.fixture
def textfolder() -> Iterator[formats.DataFormat]:
    """docs/data.md's example format, registered for one test."""
    exec(compile(_documented_example()[0], "docs/data.md", "exec"), {})
    yield formats.get_format("textfolder")
    formats._REGISTRY._entries.pop("textfolder")
    formats._FORMATS.pop("textfolder")


def test_the_documented_format_passes_the_contract_with_its_documented_sample(
        tmp_path: Path, textfolder: formats.DataFormat) -> None:
    scope: dict[str, Any] = {"Path": Path, "Sample": Sample, "TEXTS": TEXTS}
    exec(compile(_documented_example()[1], "docs/data.md", "exec"), scope)
    data, modality, labels = scope["_textfolder"](tmp_path)
    for data_format in ("textfolder", None):
        dm = FusionDataModule(**data, data_format=data_format, cache_features=False, val_fraction=0.2,
                              test_fraction=0.2)
        assert dm.modalities == [modality] and dm.labels == labels
        assert sum(len(ds) for ds, _, _ in dm._parts.values()) == len(TEXTS)
        read = [t for ds, _, _ in dm._parts.values() for t in ds["text"]]
        assert sorted(read) == sorted(t for t, _ in TEXTS)  # each file's content, once


def test_a_registered_format_works_as_a_fit_flag(tmp_path: Path, textfolder: formats.DataFormat) -> None:
    reviews = tmp_path / "reviews"
    for i in range(16):
        label = "pos" if i % 2 else "neg"
        (reviews / label).mkdir(parents=True, exist_ok=True)
        (reviews / label / f"{i}.txt").write_text(f"{'great fun' if i % 2 else 'dull and slow'} number {i}")
    assert formats.pick_format(formats.locate("", None, str(reviews))) is textfolder  # claimed with no flag too
    run = tmp_path / "run"
    code = cli.main(["fit", "--data.data_dir", str(reviews), "--data.data_format", "textfolder", "--data.batch_size",
                     "4", "--model.encoders", '{"text": "tiny-text"}', "--model.hidden_dim", "8",
                     "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(run)])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["fused"]["n"] == 2  # 16 rows, 10% carved as test
    assert FusionModel.from_pretrained(run / "model").config.labels == ("neg", "pos")
