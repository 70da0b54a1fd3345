"""A default `fusion-zoo fit` prints its progress bar, the cache lines and the result tables, not library chatter;
`--verbose` brings the chatter back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOISE = {
    "LightningCLI args warning": "args parameter is intended to run from within Python",
    "litlogger tip": "litlogger",
    "eval-mode warning": "module(s) in eval mode",
    "FLOPs column": "FLOPs",
    "transformers weight-loading bar": "Loading weights",
    "seed line": "Seed set to",
    "accelerator lines": "GPU available",
}


def _fit(tmp_path: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "FUSION_ZOO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "recipes.cli", "fit", "--model.encoders",
           '{"image": "tiny-image", "text": "minilm-l6"}', "--model.hidden_dim", "16", "--trainer.max_epochs", "1",
           "--data.max_samples", "8",
           "--trainer.default_root_dir", str(tmp_path / f"run{len(list(tmp_path.glob('run*')))}"), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow  # loads minilm-l6, whose weight loading draws transformers' progress bar
def test_default_fit_is_quiet_and_verbose_is_not(tmp_path: Path) -> None:
    out = _fit(tmp_path)
    shown = {name: text for name, text in NOISE.items() if text in out}
    assert not shown, f"noise in a default fit: {shown}\n{out}"
    assert "feature cache" in out and "test metrics" in out and "accuracy" in out  # what a run is for stays
    assert "Epoch 0/0" in out  # the progress bar
    loud = _fit(tmp_path, "--verbose")
    assert {"seed line", "transformers weight-loading bar", "FLOPs column", "litlogger tip"} <= {
        name for name, text in NOISE.items() if text in loud}


@pytest.mark.slow  # loads minilm-l6
def test_predict_is_quiet_too(tmp_path: Path) -> None:
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    FusionModel(FusionModelConfig(encoders={"text": "minilm-l6"}, labels=("a", "b"), hidden_dim=8)).save_pretrained(
        tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def predict(*extra: str) -> str:
        cmd = [sys.executable, "-m", "recipes.cli", "predict", "--model", str(tmp_path / "model"), "--text", "hello",
               *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    out = predict()  # (--verbose brings the bar back through the same configure_output the fit test checks)
    assert "[0] " in out and NOISE["transformers weight-loading bar"] not in out, out
