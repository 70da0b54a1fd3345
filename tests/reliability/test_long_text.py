"""Issue 14 (1): text is text. A text cell is never asked whether it is a file, so reviews and captions longer
than a file name (255 bytes) train like any other text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from recipes import cli
from recipes._row_checks import CheckedFiles, check_cell


def _stamp(v: str, modality: str) -> str:
    return check_cell(modality, v, CheckedFiles(None))[1]


def test_text_cells_are_never_probed_as_paths(tmp_path: Path) -> None:
    assert _stamp("x" * 300, "text") == ""  # was OSError: [Errno 36] File name too long
    assert _stamp("y" * 100_000, "text") == ""
    real = tmp_path / "a.png"
    real.write_bytes(b"123")
    assert _stamp(str(real), "text") == ""  # even an existing path in a text column is just text
    assert _stamp(str(real), "image").startswith(f"{real}:3:")
    assert _stamp("z" * 300, "image") == ""  # a too-long image path is no file (cell_problem names it)


def test_fit_trains_on_300_and_100k_character_texts(tmp_path: Path) -> None:
    rows = [("x" * 300 + f" word{i % 2}", "ab"[i % 2]) for i in range(12)]
    rows[3] = ("long " * 20_000, "b")  # 100 000 characters
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    run = tmp_path / "run"
    code = cli.main([
        "fit", "--data.data_files", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "4",
        "--model.encoders", '{"text": "tiny-text"}', "--model.hidden_dim", "8", "--trainer.max_epochs", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["text"]["n"] >= 1
    assert (run / "model" / "config.json").is_file()
