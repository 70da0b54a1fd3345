"""``recipes.build_pretrained``'s docs table comes from the built folders' cards, not from hand copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.build_pretrained import card_table


def test_card_table_reads_each_cards_metrics_and_marks_failures(tmp_path: Path) -> None:
    (tmp_path / "demo-late-concat").mkdir()
    metrics = {"test": {"fused": {"accuracy": 0.98765}, "image": {"accuracy": 0.5}, "audio": {"accuracy": 0.81234}}}
    (tmp_path / "demo-late-concat" / "config.json").write_text(json.dumps({"metrics": metrics}))
    results = [{"name": "demo-late-concat", "raw_test_accuracy": 0.9876, "seconds": 61.4, "consistent": True},
               {"name": "demo-early-moe", "error": "RuntimeError: boom"}]
    lines = card_table(results, tmp_path).splitlines()
    assert lines[0].startswith("| model | fused | text alone | image alone | audio alone |")
    assert lines[2] == "| `demo-early-moe` | failed: RuntimeError: boom | | | | | |"  # sorted by name
    assert lines[3] == "| `demo-late-concat` | 0.988 |  | 0.500 | 0.812 | 0.988 | 61 s |"  # no text metric: empty


def test_raw_split_of_a_table_dataset_resolves_file_cells_but_never_text(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw inputs for the raw-input check: image paths absolute against the data folder, questions as written (a
    question read as a relative path once fed '<folder>/what is the red shape?' to the text encoder)."""
    from PIL import Image

    from recipes.build_pretrained import raw_split

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text("image,question,answer\na.png,what is it?,yes\na.png,is it red?,no\n")
    (tmp_path / "validation.csv").write_text("image,question,answer\na.png,is it blue?,yes\na.png,is it?,no\n")
    (tmp_path / "test.csv").write_text("image,question,answer\na.png,what shape?,no\n")
    raw, labels = raw_split("test", dataset=str(tmp_path))
    assert raw["text"] == ["what shape?"] and labels == ["no"]
    assert raw["image"] == [str(tmp_path / "a.png")]
