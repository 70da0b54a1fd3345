"""Named data sources (recipes/sources.py): the registry, the built-in tridigits and easyvqa, and the one-name-one-
function rule. easy-VQA is faked (a module with the package's five functions) so the test needs no download."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import pytest

from fusion_errors import RegistryError
from recipes import easyvqa, sources
from recipes.data import FusionDataModule


def test_the_builtin_sources_are_registered_when_first_looked_up() -> None:
    assert {"tridigits", "easyvqa"} <= set(sources.list_sources())
    found = sources.get_source("easyvqa")
    assert found is not None and "easy-vqa pip package (MIT)" in found.origin
    assert sources.get_source("no-such-source") is None


def test_a_name_registers_once() -> None:
    def loader() -> tuple[datasets.DatasetDict, Path | None]:
        return datasets.DatasetDict(), None

    sources.register_source("test-once", "a test source", "tests")(loader)
    sources.register_source("test-once", "a test source", "tests")(loader)  # the same function again: fine
    with pytest.raises(RegistryError, match="registered twice"):
        sources.register_source("test-once", "another", "tests")(lambda: (datasets.DatasetDict(), None))
    sources._SOURCES.pop("test-once")


def test_tridigits_by_name_is_the_bundled_data() -> None:
    dm = FusionDataModule(dataset="tridigits", cache_features=False)
    assert dm.dataset == "tridigits" and set(dm.modalities) == {"audio", "image", "text"}


def test_easyvqa_by_name_prepares_the_folder_once_and_reads_its_columns(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.benchmarks.test_easyvqa import _fake_package

    monkeypatch.setitem(sys.modules, "easy_vqa", _fake_package(tmp_path / "pkg"))
    monkeypatch.setattr(easyvqa, "DEFAULT_DIR", tmp_path / "prepared")
    dm = FusionDataModule(dataset="easyvqa", cache_features=False)
    assert (tmp_path / "prepared" / "train.csv").is_file()
    assert dm.dataset == "easyvqa" and dm.modalities == ["image", "text"]
    assert dm.columns["text"] == "question" and dm.columns["label"] == "answer"  # found by their usual names
    assert set(dm.labels) <= {"red", "blue", "yes", "no"}
    stamp = (tmp_path / "prepared" / "train.csv").stat().st_mtime_ns
    FusionDataModule(dataset="easyvqa", cache_features=False)
    assert (tmp_path / "prepared" / "train.csv").stat().st_mtime_ns == stamp  # prepared once
