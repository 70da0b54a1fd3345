"""End to end through the CLI, as a user would: their own folder of files + CSV, and a real recipe on real weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from recipes import cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture
def user_folder(tmp_path):
    """A folder like users have: images/ and sounds/ of files, and a CSV naming them with its own column names."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "sounds").mkdir()
    rows = ["caption,photo,clip,kind"]
    for i in range(60):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        t = np.arange(8000) / 8000
        wave = 0.3 * np.sin(2 * math.pi * (200 + 300 * (i % 3)) * t) + 0.02 * rng.normal(size=t.size)
        sf.write(tmp_path / "sounds" / f"{i}.wav", wave.astype(np.float32), 8000)
        caption = "" if i % 10 == 0 else f"something {name}"  # some rows have no text: a missing modality
        rows.append(f"{caption},images/{i}.png,sounds/{i}.wav,{name}")
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_fit_on_a_user_folder_through_the_column_mapping(user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    columns = '{"text": "caption", "image": "photo", "audio": "clip", "label": "kind"}'
    tiny = '{"audio": "mel-cnn", "image": "tiny-image", "text": "tiny-text"}'
    code = cli.main(["fit", "--data.data_files", "table.csv", "--data.columns", columns,
                     "--data.val_fraction", "0.2", "--data.test_fraction", "0.2", "--data.batch_size", "8",
                     "--model.encoders", tiny, "--model.hidden_dim", "32", "--model.lr", "0.003",
                     "--trainer.max_epochs", "15", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", "run"])
    assert code == 0
    metrics = json.loads((user_folder / "run" / "metrics.json").read_text())
    assert metrics["test"]["fused"]["n"] == 12
    assert metrics["test"]["fused"]["accuracy"] >= 0.75  # colour, pitch and word each give the label away
    assert (user_folder / "run" / "model" / "model.safetensors").is_file()


def test_real_late_recipe_on_a_subset_reaches_its_stated_accuracy(tmp_path, monkeypatch):
    """The late-fusion recipe with the real frozen offline encoders, on 300 rows per split of tridigits."""
    monkeypatch.chdir(tmp_path)
    code = cli.main(["fit", "--config", "late_fusion.yaml", "--data.max_samples", "300",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["fused"]["accuracy"] >= 0.85, metrics["test"]
    alone = max(metrics["test"][m]["accuracy"] for m in ("audio", "image", "text"))
    assert metrics["test"]["fused"]["accuracy"] > alone
