"""Issue 14 (3, 7): one run, one folder (created exclusively, so two fits started in the same second keep their
own results), and resume from anywhere (``last.ckpt`` every N steps from step 0; ``--resume RUN_DIR`` finds the
latest checkpoint or says there is none and starts)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes import cli

ROOT = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("toy_fit.py")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


def _fit(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOY), "fit", *args], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_folders_are_created_exclusively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt: "20250101-120000")  # both "in the same second"
    first, second = cli._run_stamp("fit"), cli._run_stamp("fit")
    assert (first, second) == ("fit-20250101-120000", "fit-20250101-120000-2")  # was the same name twice
    assert (tmp_path / "runs" / first).is_dir() and (tmp_path / "runs" / second).is_dir()
    assert cli._run_stamp("fit", create=False) == "fit-20250101-120000"  # --trainer.default_root_dir given


def test_two_concurrent_fits_in_one_folder_keep_their_own_results(tmp_path: Path) -> None:
    procs = [_fit(tmp_path, "--trainer.max_epochs", "1", "--seed_everything", str(seed),
                  FUSION_FIXED_TIME="20250101-120000") for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["fit-20250101-120000", "fit-20250101-120000-2"]
    seeds = set()
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["test"]["fused"]["n"] == 24
        assert (run / "model" / "config.json").is_file()
        seeds.add(json.loads((run / "environment.json").read_text())["seed"])
        rows = (run / "metrics.csv").read_text().splitlines()
        assert len(rows) > 1 and len({len(r.split(",")) for r in rows}) == 1  # one run's columns, not two mixed
    assert seeds == {1, 2}


def test_a_run_killed_in_epoch_0_resumes_with_resume(tmp_path: Path) -> None:
    # 24 rows / batch 4 = 6 steps per epoch, last.ckpt every 2 steps: killed when step 3 starts, before any
    # validation (Lightning alone deferred every save to the first validation: nothing to resume from)
    killed = _fit(tmp_path, "--trainer.default_root_dir", "crash", FUSION_KILL_AT_STEP="3")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "crash/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    assert cli.latest_checkpoint(tmp_path / "crash") == last
    resumed = _fit(tmp_path, "--resume", "crash")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming crash from {Path('crash/checkpoints/last.ckpt')}" in err
    assert torch.load(last, weights_only=True)["global_step"] == 18  # 3 epochs x 6 steps, counted once
    assert (tmp_path / "crash/checkpoints/best.ckpt").is_file() and (tmp_path / "crash/metrics.json").is_file()


def test_with_default_flags_a_kill_in_epoch_0_resumes_from_the_time_based_checkpoint(tmp_path: Path) -> None:
    """No step schedule (the default): last.ckpt is still written mid-epoch once --checkpoint.last_every_minutes
    passed (here a microsecond, so after every step), so a kill in the first epoch resumes (issue 30, 9)."""
    timed = ("--checkpoint.every_n_train_steps", "0", "--checkpoint.last_every_minutes", "1e-8")
    killed = _fit(tmp_path, "--trainer.default_root_dir", "crash", *timed, FUSION_KILL_AT_STEP="3")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "crash/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0  # written after step 3, mid-epoch, before validation
    resumed = _fit(tmp_path, "--resume", "crash", *timed)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 18


def test_the_checkpoint_time_limit_is_on_by_default_and_checked(capsys: pytest.CaptureFixture) -> None:
    from recipes.callbacks import LAST_EVERY_MINUTES, FusionCheckpoint

    assert FusionCheckpoint().last_every_minutes == LAST_EVERY_MINUTES > 0
    assert cli.main(["fit", "--checkpoint.last_every_minutes", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint.last_every_minutes -1" in err[0] and "must be a number >= 0" in err[0]


def test_a_reused_run_folder_is_refused_in_one_line_and_resume_still_continues_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30 (10): a second fit into a folder that holds a run would replace its metrics, model and config."""
    first = _fit(tmp_path, "--trainer.default_root_dir", "run", "--trainer.max_epochs", "1")
    assert first.communicate(timeout=300) and first.returncode == 0
    before = (tmp_path / "run/metrics.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--trainer.default_root_dir", "run", "--trainer.max_epochs", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--trainer.default_root_dir run already holds a run (metrics.json, model, config.yaml)" \
        in lines[0] and "--resume run" in lines[0]
    assert (tmp_path / "run/metrics.json").read_bytes() == before
    resumed = _fit(tmp_path, "--resume", "run", "--trainer.max_epochs", "2")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]


def test_resume_without_a_checkpoint_says_so_and_starts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("reliability_toy_runs", TOY)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.chdir(tmp_path)
    start = time.time()
    toy.run(["fit", "--trainer.max_epochs", "1", "--resume", "fresh"])
    assert "no checkpoint in fresh/checkpoints yet; starting that run from the beginning" in capsys.readouterr().err
    assert (tmp_path / "fresh/metrics.json").stat().st_mtime >= start
    assert not (tmp_path / "runs").exists()  # the named run folder is used, no other one is made
