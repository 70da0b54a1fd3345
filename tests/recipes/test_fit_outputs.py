"""What a fit leaves and logs: confusion matrix and curves (PNG), MoE telemetry and its plot, TensorBoard or a
one-line error naming the extra; and DDP with a global --data.batch_size that matches one process."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from encoders import ModalityOutput
from recipes import cli

ROOT = Path(__file__).resolve().parents[2]
TOYS = Path(__file__).with_name("test_module.py")  # registers fake-image / fake-text encoders
spec = importlib.util.spec_from_file_location("fit_outputs_toys", TOYS)
toys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toys)

MODEL = ["--model.encoders", '{"image": "fake-image", "text": "fake-text"}', "--model.hidden_dim", "16"]
TRAINER = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--seed_everything", "0"]


class NoisyDataModule(pl.LightningDataModule):
    """Cached features with a weak class signal (accuracy well below 1 after a short fit), batched per rank:
    a DistributedSampler hands each process every other batch, as Lightning does with the real data module."""

    def __init__(self, num_samples: int = 192, batch_size: int = 32, signal: float = 0.6) -> None:
        super().__init__()
        self.num_samples, self.batch_size, self.signal = num_samples, batch_size, signal
        self.labels = list(toys.LABELS)
        self.modalities: list[str] | None = None  # the encoders named in the model decide

    def setup(self, stage: str | None = None) -> None:
        dims = self.trainer.lightning_module.model.embed_dims
        self.splits = {s: self._make(dims, seed) for seed, s in enumerate(("train", "validation", "test"))}

    def _make(self, dims: dict[str, int], seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        n = self.num_samples if seed == 0 else 384
        y = torch.randint(0, len(self.labels), (n,), generator=g)
        feats = {m: torch.randn(n, d, generator=g) + self.signal * torch.nn.functional.one_hot(y, d).float()
                 for m, d in dims.items()}
        out = []
        for start in range(0, n, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, n))
            inputs = {m: ModalityOutput(x[idx][:, None], torch.ones(len(idx), 1, dtype=torch.bool), x[idx])
                      for m, x in feats.items()}
            out.append({"inputs": inputs, "labels": y[idx], "index": idx})
        return out

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=None)


def fit(tmp_path: Path, *args: str) -> cli.FusionCLI:
    return cli._lightning(["fit", "--trainer.default_root_dir", str(tmp_path), *MODEL, *TRAINER,
                           "--trainer.max_epochs", "3", *args], datamodule_class=NoisyDataModule)


def test_fit_writes_confusion_matrix_curves_and_moe_telemetry(tmp_path: Path, capsys) -> None:
    run = fit(tmp_path, "--model.fusion_head", "moe", "--model.stage", "early")
    out = capsys.readouterr().out
    for name in ("confusion_matrix.png", "training_curves.png", "moe_utilisation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert str(tmp_path / name) in out  # listed at the end of the fit
    metrics = json.loads((tmp_path / "metrics.json").read_text())["test"]["fused"]
    counts = run.model.test_confusion  # [true, predicted]
    assert int(counts.sum()) == metrics["n"] == 384
    assert float(counts.trace()) / 384 == pytest.approx(metrics["accuracy"], abs=1e-6)  # torchmetrics' number
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    experts = sorted(k for k in rows[0] if k.startswith("train/moe/utilisation_"))
    assert len(experts) == run.model.model.fusion_head.num_experts
    per_epoch = [r for r in rows if r[experts[0]]]
    assert len(per_epoch) == 3  # one row per epoch
    for r in per_epoch:
        share = sum(float(r[k]) for k in experts)  # shares of the routed slots: 1 minus what capacity dropped
        assert 0.5 < share <= 1.0 + 1e-4
        entropy = float(r["train/moe/routing_entropy"])
        assert 0.0 <= entropy <= torch.log(torch.tensor(float(len(experts)))).item() + 1e-5


def test_fit_without_moe_has_no_utilisation_plot(tmp_path: Path) -> None:
    fit(tmp_path, "--trainer.max_epochs", "1")
    assert (tmp_path / "confusion_matrix.png").is_file() and (tmp_path / "training_curves.png").is_file()
    assert not (tmp_path / "moe_utilisation.png").exists()


@pytest.mark.parametrize("logger", ["tensorboard", "TensorBoardLogger", "pytorch_lightning.loggers.TensorBoardLogger"])
def test_tensorboard_logger_writes_into_the_run_folder(tmp_path: Path, logger: str) -> None:
    """The short name and the class forms need no save_dir; one layout for every logger: the event files sit in the
    run folder beside metrics.json and metrics.csv, and the curves and MoE plots are still drawn."""
    pytest.importorskip("tensorboard")
    run = fit(tmp_path, "--trainer.logger", logger, "--trainer.max_epochs", "2", "--model.fusion_head", "moe",
              "--model.stage", "early")
    assert [type(lg).__name__ for lg in run.trainer.loggers] == ["CSVLogger", "TensorBoardLogger"]
    events = list(tmp_path.rglob("events.out.tfevents.*"))  # one file per writer: fit, then validate and test
    assert events and {e.parent for e in events} == {tmp_path}
    for name in ("metrics.json", "metrics.csv", "training_curves.png", "moe_utilisation.png", "model/config.json",
                 "checkpoints/best.ckpt", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "lightning_logs").exists() and not list(tmp_path.glob("version_*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {t for e in events for t in EventAccumulator(str(e)).Reload().Tags()["scalars"]}
    assert {"train/loss", "val/loss", "test/fused/accuracy"} <= tags


def test_tensorboard_logger_keeps_an_explicit_save_dir(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    fit(tmp_path / "run", "--trainer.logger", "tensorboard", "--trainer.logger.save_dir", str(tmp_path / "tb"),
        "--trainer.max_epochs", "1")
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "training_curves.png").is_file() and (tmp_path / "run" / "metrics.json").is_file()


def test_a_recipe_yaml_naming_tensorboard_without_save_dir_logs_into_the_run_folder(tmp_path: Path) -> None:
    """TensorBoardLogger's save_dir is required: a recipe file that leaves it out used to fail to parse."""
    pytest.importorskip("tensorboard")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer:\n  logger:\n    class_path: pytorch_lightning.loggers.TensorBoardLogger\n")
    fit(tmp_path / "run", "--config", str(recipe), "--trainer.max_epochs", "1")
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_csv_logger_short_name_is_the_default_layout(tmp_path: Path) -> None:
    run = fit(tmp_path, "--trainer.logger", "csv", "--trainer.max_epochs", "1")
    assert [type(lg).__name__ for lg in run.trainer.loggers] == ["CSVLogger"]
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "training_curves.png").is_file()


def test_tensorboard_logger_without_tensorboard_names_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    hidden = ("tensorboard", "tensorboardX")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in hidden else real(name, *a))
    monkeypatch.setattr(cli, "_lightning", lambda argv, datamodule_class=None, _f=cli._lightning:
                        _f(argv, datamodule_class=NoisyDataModule))
    code = cli.main(["fit", "--trainer.default_root_dir", str(tmp_path), *MODEL, *TRAINER,
                     "--trainer.logger", "tensorboard", "--trainer.max_epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pip install 'fusion-zoo[tensorboard]'" in err[0]


DDP_SCRIPT = """
import importlib.util, json, sys
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("fit_outputs", {here!r})
here = importlib.util.module_from_spec(spec)
spec.loader.exec_module(here)
from recipes import cli
run = cli._lightning(sys.argv[1:], datamodule_class=here.NoisyDataModule)
if run.trainer.is_global_zero:
    print("STEPS", run.trainer.global_step, "BATCH", run.datamodule.batch_size)
"""


def test_ddp_global_batch_matches_one_process(tmp_path: Path) -> None:
    """Same global batch, same optimizer steps, same test accuracy within seed noise (2 gloo CPU processes)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), here=str(Path(__file__)))))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = {}
    for procs in (1, 2):
        folder = tmp_path / f"p{procs}"
        args = ["fit", "--trainer.default_root_dir", str(folder), *MODEL, *TRAINER, "--trainer.max_epochs", "3",
                "--data.batch_size", "32", "--data.signal", "1.0", "--trainer.accelerator", "cpu",
                "--trainer.devices", str(procs)]
        if procs == 2:
            args += ["--trainer.strategy", "ddp"]
        proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("STEPS"))
        steps, per_process = int(line.split()[1]), int(line.split()[3])
        accuracy = json.loads((folder / "metrics.json").read_text())["test"]["fused"]["accuracy"]
        results[procs] = (steps, per_process, accuracy)
    assert results[1][:2] == (3 * 6, 32)  # 192 rows / 32 per step = 6 steps per epoch
    assert results[2][:2] == (3 * 6, 16)  # two processes x 16 rows: same steps as one process
    # within seed noise: 3 standard errors of the difference of two accuracies on 384 test rows
    p = (results[1][2] + results[2][2]) / 2
    assert abs(results[1][2] - results[2][2]) <= 3 * (2 * p * (1 - p) / 384) ** 0.5, results
