"""The encoder probe (recipes/probe.py): the paired z, the choice on data where one candidate sees the label and the
other does not, the default kept without a significant gain, ``fusion-zoo fit`` running and recording it, and (slow,
real weights) the issue's two cases: clean 96-px shapes pick the 224-px EfficientNet-Lite0, 8-px digits keep the
64-px EfficientNet + thumbnail composite."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from recipes import cli, probe, task
from recipes.data import FusionDataModule
from recipes.probe import (
    HEAD_MIN_Z,
    MIN_Z,
    ProbeReport,
    compact_head,
    format_probe_table,
    paired_z,
    probe_encoders,
)
from zoo.config import FusionModelConfig

WORDS = ("apple", "river", "stone", "cloud", "green", "paper", "lamp", "music")
COLOURS = {"red": (200, 60, 60), "green": (60, 130, 60)}
ROW_KEYS = {"modality", "encoder", "val_accuracy", "val_loss", "z_vs_default", "chosen", "seconds"}


# ---------------------------------------------------------------------------------------------------- data folders
def _write_split_csvs(root: Path, rows: dict[str, list[dict[str, str]]]) -> None:
    for split, split_rows in rows.items():
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "text", "label"])
            writer.writeheader()
            writer.writerows(split_rows)


def _noise_text(rng: np.random.Generator) -> str:
    return " ".join(str(w) for w in rng.choice(WORDS, 3))


def _write_image_folder(root: Path, sizes: tuple[int, int, int], draw: Any) -> Path:
    """train/validation/test CSVs of PNGs made by ``draw(i, rng) -> (image, label)`` plus random words as text."""
    rng = np.random.default_rng(0)
    (root / "png").mkdir(parents=True)
    rows: dict[str, list[dict[str, str]]] = {}
    k = 0
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
        rows[split] = []
        for i in range(n):
            image, label = draw(i, rng)
            image.save(root / "png" / f"{k}.png")
            rows[split].append({"image": f"png/{k}.png", "text": _noise_text(rng), "label": label})
            k += 1
    _write_split_csvs(root, rows)
    return root


def _write_colour_folder(root: Path, sizes: tuple[int, int, int] = (60, 40, 10)) -> Path:
    """16x16 RGB noise on a red or a green ground (label = the colour), random words as text.

    The label is plain to an RGB network (``tiny-image``) and invisible to the ``pixels`` thumbnail: gray, then
    standardised per image, every picture is the same noise whatever its colour.
    """
    def draw(i: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
        label = ("red", "green")[i % 2]
        x = np.clip(np.array(COLOURS[label])[None, None] + rng.normal(0, 20, (16, 16, 3)), 0, 255)
        return Image.fromarray(x.astype(np.uint8), "RGB"), label

    return _write_image_folder(root, sizes, draw)


def _write_bar_folder(root: Path, sizes: tuple[int, int, int] = (60, 40, 10)) -> Path:
    """16x16 gray noise with a bright bar at the top or the bottom (label = where), random words as text: both
    ``tiny-image`` and ``pixels`` read it perfectly."""
    def draw(i: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
        label = i % 2
        x = np.clip(rng.normal(60, 30, (16, 16)), 0, 255)
        x[2 + 8 * label: 6 + 8 * label, 2:14] = 230
        return Image.fromarray(x.astype(np.uint8), "L"), ("top", "bottom")[label]

    return _write_image_folder(root, sizes, draw)


def _probe(root: Path, start: str, image_candidates: tuple[str, ...], hidden_dim: int = 16,
           cache_features: bool = True) -> ProbeReport:
    dm = FusionDataModule(data_dir=str(root), cache_dir=str(root.parent / "cache"), batch_size=32,
                          cache_features=cache_features)
    base = FusionModelConfig(encoders={"image": start, "text": "tiny-text"}, labels=tuple(dm.labels),
                             hidden_dim=hidden_dim)
    torch.manual_seed(0)  # the random tiny encoders the probe builds
    return probe_encoders(dm, base, candidates={"image": image_candidates}, seed=0, echo=lambda _: None)


def _row(report: ProbeReport, encoder: str) -> dict:
    [row] = [r for r in report.rows if r["encoder"] == encoder]
    return row


# -------------------------------------------------------------------------------------------------------- paired_z
def _mcnemar(b: int, c: int) -> float:
    """McNemar's z without continuity correction: b rows only the candidate gets right, c only the base."""
    return (b - c) / math.sqrt(b + c)


def test_paired_z_is_zero_when_every_row_ties() -> None:
    rows = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert paired_z(rows, rows.clone()) == 0.0
    assert paired_z(torch.ones(40), torch.ones(40)) == 0.0


def test_paired_z_of_ten_more_right_rows_and_no_losses() -> None:
    n = 40
    base = torch.zeros(n)
    base[20:] = 1  # right on the last 20 rows
    better = base.clone()
    better[:10] = 1  # ... and the candidate also on the first 10
    assert paired_z(better, base) == pytest.approx(math.sqrt(10), rel=1e-9)  # McNemar: (10 - 0) / sqrt(10)
    # right on every row where the base is wrong: a decisive win, not 0/0
    assert paired_z(torch.ones(n), torch.zeros(n)) == pytest.approx(math.sqrt(n), rel=1e-9)


def test_paired_z_counts_losses_and_is_negative_when_worse() -> None:
    n, b, c = 50, 10, 5
    base = torch.zeros(n)
    base[b: b + c] = 1  # the base wins these c rows
    better = torch.zeros(n)
    better[:b] = 1  # the candidate wins these b rows
    z = paired_z(better, base)
    assert z == pytest.approx(_mcnemar(b, c), rel=1e-9)
    assert 0 < z < MIN_Z < paired_z(better, torch.zeros(n))  # losses count against the candidate
    assert paired_z(base, better) == pytest.approx(-z, rel=1e-9)


# ------------------------------------------------------------------------------------------- probe_encoders (fast)
def test_probe_picks_the_encoder_that_sees_the_label(tmp_path: Path) -> None:
    data = _write_colour_folder(tmp_path / "data")
    report = _probe(data, "pixels", ("pixels", "tiny-image"))
    table = format_probe_table(report)
    assert report.choice == {"image": "tiny-image", "text": "tiny-text"}, table
    assert [r["encoder"] for r in report.rows] == ["pixels", "tiny-image"]  # one row per candidate, in order
    assert all(set(r) == ROW_KEYS and r["modality"] == "image" for r in report.rows)
    pixels, tiny = _row(report, "pixels"), _row(report, "tiny-image")
    assert tiny["val_accuracy"] >= 0.9 and pixels["val_accuracy"] <= 0.75, table  # colour vs gray noise
    assert tiny["z_vs_default"] >= MIN_Z and pixels["z_vs_default"] == 0.0
    assert tiny["chosen"] is True and pixels["chosen"] is False
    assert (report.train_rows, report.val_rows) == (60, 40)
    assert "pixels" in table and "tiny-image" in table
    assert [line for line in table.splitlines() if line.endswith("<- chosen")] == \
        [line for line in table.splitlines() if "tiny-image" in line]
    doc = report.to_dict()
    assert doc["choice"] == report.choice and doc["candidates"] == report.rows
    assert {"seconds", "train_rows", "val_rows"} <= set(doc)


def test_probe_without_the_feature_cache_encodes_in_memory_and_chooses_alike(tmp_path: Path) -> None:
    """``--data.cache_features false`` with no encoders named crashed in the probe (it read raw batches as
    features); the probe now encodes its sample in memory and writes nothing to the cache folder."""
    data = _write_colour_folder(tmp_path / "data")
    report = _probe(data, "pixels", ("pixels", "tiny-image"), cache_features=False)
    assert report.choice == {"image": "tiny-image", "text": "tiny-text"}, format_probe_table(report)
    assert not list((tmp_path / "cache").glob("*.features"))


def test_probe_keeps_the_default_when_the_other_is_worse(tmp_path: Path) -> None:
    data = _write_colour_folder(tmp_path / "data")
    report = _probe(data, "tiny-image", ("tiny-image", "pixels"))
    assert report.choice["image"] == "tiny-image", format_probe_table(report)
    assert _row(report, "pixels")["z_vs_default"] < 0 and _row(report, "tiny-image")["z_vs_default"] == 0.0


def test_probe_keeps_the_default_without_a_significant_gain(tmp_path: Path) -> None:
    """Both candidates read the bar perfectly: the starting encoder stays whichever has the lower loss."""
    data = _write_bar_folder(tmp_path / "data")
    report = _probe(data, "tiny-image", ("tiny-image", "pixels"))
    table = format_probe_table(report)
    assert report.choice == {"image": "tiny-image", "text": "tiny-text"}, table
    assert all(r["val_accuracy"] >= 0.9 for r in report.rows), table
    assert _row(report, "pixels")["z_vs_default"] < MIN_Z and _row(report, "tiny-image")["chosen"] is True


def test_probe_skips_single_candidates_and_absent_modalities(tmp_path: Path) -> None:
    data = _write_bar_folder(tmp_path / "data", sizes=(6, 4, 2))
    dm = FusionDataModule(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    base = FusionModelConfig(encoders={"image": "pixels", "text": "tiny-text"}, labels=tuple(dm.labels))
    report = probe_encoders(dm, base, candidates={"image": ("pixels",), "audio": ("tiny-whisper", "whisper-base")})
    assert report.choice == {"image": "pixels", "text": "tiny-text"} and report.rows == []
    assert format_probe_table(report) == ""


# ------------------------------------------------------------------------------------------------ the head probe
def _scored_heads(monkeypatch: pytest.MonkeyPatch, right: dict[int, int], rows: int = 40) -> list[int]:
    """Make the probe's head training deterministic: a head of width W is right on the first ``right[W]`` of
    ``rows`` validation rows. Returns the widths trained, in order."""
    trained: list[int] = []

    def fake(cfg: FusionModelConfig, train: Any, val: Any, lr: float, batch_size: int,
             seed: int) -> tuple[float, float, torch.Tensor]:
        trained.append(cfg.hidden_dim)
        ok = (torch.arange(rows) < right[cfg.hidden_dim]).float()
        return float(ok.mean()), 1.0 - float(ok.mean()), ok

    monkeypatch.setattr(probe, "_fit_score", fake)
    return trained


def _head_probe(root: Path, hidden_dim: int = 32) -> ProbeReport:
    dm = FusionDataModule(data_dir=str(root), cache_dir=str(root.parent / "cache"), batch_size=32)
    base = FusionModelConfig(encoders={"image": "pixels", "text": "tiny-text"}, labels=tuple(dm.labels),
                             hidden_dim=hidden_dim)
    return probe_encoders(dm, base, candidates={}, seed=0, echo=lambda _: None, head=True)


def test_compact_head_halves_the_width_and_makes_concat_linear() -> None:
    concat = FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=64)
    assert compact_head(concat) == {"hidden_dim": 32, "head_options": {"hidden_dim": 0}}
    gating = concat.replace(fusion_head="gating", head_options={})
    assert compact_head(gating) == {"hidden_dim": 32}
    assert concat.replace(**compact_head(concat)).head_options["hidden_dim"] == 0  # a valid config


def test_head_probe_picks_the_compact_head_when_it_wins_clearly(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_bar_folder(tmp_path / "data")
    trained = _scored_heads(monkeypatch, {32: 30, 16: 36})  # 6 more rows right, none lost: z = sqrt(6) > 1
    report = _head_probe(data)
    assert trained == [32, 16]
    assert report.head == {"hidden_dim": 16, "head_options": {"hidden_dim": 0}}
    heads = [r for r in report.rows if r["modality"] == "head"]
    assert [r["encoder"] for r in heads] == ["default (hidden 32)", "compact (hidden 16)"]
    assert [r["chosen"] for r in heads] == [False, True] and heads[1]["z_vs_default"] >= HEAD_MIN_Z
    assert ProbeReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert "a head at z >= 1" in format_probe_table(report)


def test_head_probe_keeps_the_default_without_a_clear_gain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_bar_folder(tmp_path / "data")
    _scored_heads(monkeypatch, {32: 30, 16: 31})  # one more row: z = 1 ... not above the default by the rule's margin
    monkeypatch.setattr(probe, "HEAD_MIN_Z", 1.5)
    report = _head_probe(data)
    assert report.head == {} and [r["chosen"] for r in report.rows] == [True, False]
    _scored_heads(monkeypatch, {32: 36, 16: 30})  # the default is better
    assert _head_probe(data).head == {}


def test_head_probe_only_when_the_whole_training_split_fits_the_sample(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_bar_folder(tmp_path / "data")
    trained = _scored_heads(monkeypatch, {32: 30, 16: 36})
    monkeypatch.setattr(probe, "MAX_TRAIN_ROWS", 59)  # the split has 60 rows: a sample cannot judge the head
    report = _head_probe(data)
    assert trained == [] and report.rows == [] and report.head == {}


# --------------------------------------------------------------------------------------------------------- the CLI
CLI_ARGS = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
            "--model.hidden_dim", "16", "--data.batch_size", "32"]


@pytest.fixture
def tiny_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A colour folder, tiny default encoders and tiny probe candidates (no real weights); returns the folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSION_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(task, "DEFAULT_ENCODERS", {"audio": "tiny-whisper", "image": "pixels", "text": "tiny-text"})
    monkeypatch.setattr(probe, "CANDIDATES", {"audio": ("tiny-whisper",), "image": ("pixels", "tiny-image"),
                                              "text": ("tiny-text",)})
    torch.manual_seed(0)
    return _write_colour_folder(tmp_path / "data")


def _fit(data: Path, run_dir: Path, *extra: str) -> dict:
    assert cli.main(["fit", "--data.data_dir", str(data), "--trainer.default_root_dir", str(run_dir), *CLI_ARGS,
                     *extra]) == 0
    [metrics] = list(run_dir.rglob("metrics.json"))
    return json.loads(metrics.read_text())


def test_fit_without_encoders_runs_the_probe_and_records_it(tiny_defaults: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = _fit(tiny_defaults, run_dir)
    found = metrics["encoder_probe"]
    assert found["choice"] == {"image": "tiny-image", "text": "tiny-text"}  # the probe swapped pixels out
    assert [c["encoder"] for c in found["candidates"]] == ["pixels", "tiny-image"]
    assert {"seconds", "train_rows", "val_rows"} <= set(found)
    [model_dir] = [p.parent for p in run_dir.rglob("config.json") if (p.parent / "README.md").is_file()]
    readme = (model_dir / "README.md").read_text()
    assert "encoder probe" in readme and "tiny-image" in readme
    config = json.loads((model_dir / "config.json").read_text())
    for encoders in (config["model"]["encoders"], config["encoders"]):  # the model's config and the card's record
        assert {m: e["name"] for m, e in encoders.items()} == found["choice"]


def test_fit_with_the_probe_off_or_encoders_named_skips_it(tiny_defaults: Path, tmp_path: Path) -> None:
    off = _fit(tiny_defaults, tmp_path / "off", "--model.probe_encoders", "false")
    assert "encoder_probe" not in off and "test" in off
    named = _fit(tiny_defaults, tmp_path / "named", "--model.encoders", '{"image": "pixels", "text": "tiny-text"}')
    assert "encoder_probe" not in named and "test" in named
    for run in ("off", "named"):
        [readme] = list((tmp_path / run).rglob("README.md"))
        assert "encoder probe" not in readme.read_text()


def test_fit_with_no_width_set_probes_the_head_and_saves_the_choice(tiny_defaults: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    default = FusionModelConfig.__dataclass_fields__["hidden_dim"].default
    _scored_heads(monkeypatch, {default: 30, default // 2: 38})
    args = [a for a in CLI_ARGS if a not in ("--model.hidden_dim", "16")]
    assert cli.main(["fit", "--data.data_dir", str(tiny_defaults), "--trainer.default_root_dir", str(tmp_path / "r"),
                     "--model.encoders", '{"image": "pixels", "text": "tiny-text"}', *args]) == 0
    [metrics] = list((tmp_path / "r").rglob("metrics.json"))
    found = json.loads(metrics.read_text())["encoder_probe"]
    assert found["head"] == {"hidden_dim": default // 2, "head_options": {"hidden_dim": 0}}
    assert [c["modality"] for c in found["candidates"]] == ["head", "head"]  # encoders named: only the head
    [config] = [p for p in (tmp_path / "r").rglob("config.json") if (p.parent / "README.md").is_file()]
    model = json.loads(config.read_text())["model"]
    assert model["hidden_dim"] == default // 2 and model["head_options"]["hidden_dim"] == 0
    assert "compact (hidden" in (config.parent / "README.md").read_text()


# -------------------------------------------------------------------------------- the cases (real weights)
REAL_CANDIDATES = {"image": ("efficientnet-lite0-pixels", "efficientnet-lite0", "pixels")}
SHAPES = ("circle", "square", "triangle")


def _shape(shape: str, rng: np.random.Generator, side: int = 96) -> Image.Image:
    """One clean shape, 8..30 px across, of a random colour at a random place on a ground of another colour."""
    ground = tuple(int(v) for v in rng.integers(0, 256, 3))
    fill = ground
    while sum(abs(a - b) for a, b in zip(ground, fill, strict=True)) < 200:
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (side, side), ground)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(8, 31)) // 2
    cx, cy = (int(v) for v in rng.integers(r + 2, side - r - 2, 2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _real_probe(root: Path) -> ProbeReport:
    dm = FusionDataModule(data_dir=str(root), cache_dir=str(root.parent / "cache"), batch_size=32)
    base = FusionModelConfig(encoders={"image": task.DEFAULT_ENCODERS["image"], "text": "tiny-text"},
                             labels=tuple(dm.labels))
    assert base.encoders["image"].name == "efficientnet-lite0-pixels"  # the default the probe starts from
    torch.manual_seed(0)
    report = probe_encoders(dm, base, candidates=REAL_CANDIDATES, seed=0, echo=lambda _: None)
    print(format_probe_table(report))
    return report


@pytest.mark.slow
def test_probe_picks_the_224px_encoder_on_clean_96px_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    (root / "png").mkdir(parents=True)
    rows: dict[str, list[dict[str, str]]] = {}
    k = 0
    for split, n in (("train", 120), ("validation", 120), ("test", 21)):  # 120 validation rows: z ~3-5, not ~2.5
        rows[split] = []
        for i in range(n):
            _shape(SHAPES[i % 3], rng).save(root / "png" / f"{k}.png")
            rows[split].append({"image": f"png/{k}.png", "text": "a shape", "label": SHAPES[i % 3]})
            k += 1
    _write_split_csvs(root, rows)
    report = _real_probe(root)
    table = format_probe_table(report)
    assert report.choice["image"] == "efficientnet-lite0", table
    assert _row(report, "efficientnet-lite0")["z_vs_default"] >= MIN_Z
    assert _row(report, "pixels")["val_accuracy"] < _row(report, "efficientnet-lite0-pixels")["val_accuracy"]


@pytest.mark.slow
def test_probe_keeps_the_composite_on_8px_digits(tmp_path: Path) -> None:
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    root = tmp_path / "digits"
    (root / "png").mkdir(parents=True)
    rows: dict[str, list[dict[str, str]]] = {}
    start = 0
    for split, n in (("train", 400), ("validation", 150), ("test", 20)):
        rows[split] = []
        for i in order[start: start + n]:
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), "L")  # 8x8, as it is
            img.save(root / "png" / f"{i}.png")
            rows[split].append({"image": f"png/{i}.png", "text": "a digit", "label": str(digits.target[i])})
        start += n
    _write_split_csvs(root, rows)
    report = _real_probe(root)
    table = format_probe_table(report)
    assert report.choice["image"] == "efficientnet-lite0-pixels", table
    composite = _row(report, "efficientnet-lite0-pixels")
    assert composite["chosen"] is True and composite["val_accuracy"] >= 0.9
    assert all(r["val_accuracy"] <= composite["val_accuracy"] for r in report.rows), table
    assert all(r["z_vs_default"] < MIN_Z for r in report.rows), table


def test_a_candidate_that_cannot_run_is_skipped_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusion_errors import MissingDependencyError

    real = probe.create_encoder

    def create(name: str, **kw: Any) -> Any:
        if name == "tiny-image":
            raise MissingDependencyError("tiny-image needs a package: pip install it")
        return real(name, **kw)

    monkeypatch.setattr(probe, "create_encoder", create)
    report = _probe(_write_colour_folder(tmp_path / "data"), "pixels", ("pixels", "tiny-image"))
    assert report.choice["image"] == "pixels"
    assert _row(report, "tiny-image")["error"].startswith("MissingDependencyError")
    assert "skipped: MissingDependencyError" in format_probe_table(report)
