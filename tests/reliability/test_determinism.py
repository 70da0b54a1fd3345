"""With one seed, two `fusion-zoo fit` runs give identical metrics on CPU; every run and every saved model
records its seed and library versions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from recipes.callbacks import AtomicCheckpointIO, ResumeCallback

TOY = Path(__file__).with_name("toy_fit.py")


def _toy():
    spec = importlib.util.spec_from_file_location("reliability_toy_fit", TOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _toy()


def _fit(run_dir: Path, seed: int) -> dict:
    run = toy.run(["fit", "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed),
                   "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "0"])
    assert isinstance(run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, ResumeCallback) for c in run.trainer.callbacks)
    return json.loads((run_dir / "metrics.json").read_text())


def test_same_seed_same_metrics_and_weights(tmp_path: Path) -> None:
    first, second = _fit(tmp_path / "a", 7), _fit(tmp_path / "b", 7)
    assert first == second
    wa = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    _fit(tmp_path / "c", 8)
    wc = torch.load(tmp_path / "c/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed really drives the run


def test_seed_and_versions_are_recorded_in_run_and_model(tmp_path: Path) -> None:
    _fit(tmp_path, 11)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["seed"] == 11 and env["command"].startswith("fusion-zoo fit")
    assert {"torch", "python", "pytorch-lightning", "numpy"} <= set(env["libraries"])
    assert env["libraries"]["torch"] in torch.__version__
    assert "seed_everything: 11" in (tmp_path / "config.yaml").read_text()
    card = json.loads((tmp_path / "model/config.json").read_text())
    assert card["seed"] == 11 and "torch" in card["libraries"]
    readme = (tmp_path / "model/README.md").read_text()
    assert "Seed: 11." in readme and "torch " in readme
