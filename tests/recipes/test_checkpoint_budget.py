"""What a fit writes into its run folder's checkpoints: best.ckpt (weights only) when the metric improves,
last.ckpt (what --resume needs) every ``last_every_n_epochs`` epochs and at the end; the main job's budget
(< 100 MB written in total, each checkpoint <= 10 MB); a kill loses at most that interval and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import callbacks
from recipes.callbacks import LAST_EVERY_N_EPOCHS, FusionCheckpoint

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests" / "reliability" / "toy_fit.py"
# the toy: 24 rows / batch 4 = 6 steps per epoch. TOY_ARGS saves every 2 steps; null restores the epoch schedule
EPOCH_SCHEDULE = ["--checkpoint.every_n_train_steps", "null", "--early_stopping.patience", "50"]
STEPS_PER_EPOCH = 6
KILL_TEST_INTERVAL = 3  # last.ckpt every 3 epochs in the kill test, so the 7-epoch toy has one before the kill

# The main job (`fusion-zoo fit`, default recipe, tridigits), measured 2026-11-30 on the rebalanced data (its
# metrics.csv): 40 epochs, val/loss improved in 9 of them (epochs 0-3, 8, 9, 18, 19, 28); last.ckpt 6.79 MB (head
# weights + AdamW state), best.ckpt 2.26 MB (weights only)
MAIN_JOB_EPOCHS, MAIN_JOB_IMPROVEMENTS, MAIN_LAST_BYTES, MAIN_BEST_BYTES = 40, 9, 6.8e6, 2.3e6


def _toy_module():
    sys.path.insert(0, str(TOY.parent))
    import toy_fit

    return toy_fit


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Record (file name, global step, bytes) of every checkpoint written (all go through AtomicCheckpointIO)."""
    writes: list[tuple[str, int, int]] = []
    real = callbacks.AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        real(self, checkpoint, path, storage_options)
        writes.append((Path(path).name, int(checkpoint["global_step"]), Path(path).stat().st_size))

    monkeypatch.setattr(callbacks.AtomicCheckpointIO, "save_checkpoint", save)
    return writes


def _last_writes(epochs: int, every: int) -> int:
    """last.ckpt writes of an E-epoch run: after epochs every, 2*every, ... and once more at the end if E is not one."""
    return epochs // every + (epochs % every != 0)


def test_best_every_improvement_last_every_n_epochs_and_at_the_end(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    writes = _count_writes(monkeypatch)
    _toy_module().run(["fit", "--trainer.max_epochs", "7", "--trainer.default_root_dir", "run", *EPOCH_SCHEDULE])
    last = [step for name, step, _ in writes if name == "last.ckpt"]
    best = [step for name, step, _ in writes if name == "best.ckpt"]
    assert LAST_EVERY_N_EPOCHS == 5
    assert last == [30, 42]  # end of epoch 5, then the end of training (epoch 7)
    assert best and best[0] == 6 and len(best) == len(set(best)) <= 7  # checked after every epoch, from epoch 1
    assert all(step % STEPS_PER_EPOCH == 0 for step in best)
    sizes = {name: {b for n, _, b in writes if n == name} for name in ("best.ckpt", "last.ckpt")}
    assert max(sizes["best.ckpt"]) * 2 < min(sizes["last.ckpt"])  # best: weights only; last: + AdamW state
    on_disk = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert on_disk == ["best.ckpt", "last.ckpt"]  # no temp files left behind


def test_interval_is_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    writes = _count_writes(monkeypatch)
    _toy_module().run(["fit", "--trainer.max_epochs", "3", "--trainer.default_root_dir", "run", *EPOCH_SCHEDULE,
                       "--checkpoint.last_every_n_epochs", "1"])
    assert [step for name, step, _ in writes if name == "last.ckpt"] == [6, 12, 18]


def test_a_one_epoch_run_has_best_and_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    writes = _count_writes(monkeypatch)
    _toy_module().run(["fit", "--trainer.max_epochs", "1", "--trainer.default_root_dir", "run", *EPOCH_SCHEDULE])
    assert sorted(name for name, _, _ in writes) == ["best.ckpt", "last.ckpt"]
    assert (tmp_path / "run/checkpoints/best.ckpt").is_file() and (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "run/metrics.json").is_file()


def test_the_main_job_writes_under_100_mb() -> None:
    """The main job's measured write count at its measured sizes: fails when the default interval would let the
    run write 100 MB or more (every 3 epochs: 115 MB; every epoch: 293 MB)."""
    assert FusionCheckpoint(dirpath=None).last_every_n_epochs == LAST_EVERY_N_EPOCHS  # the default the CLI uses
    e = MAIN_JOB_EPOCHS
    total = MAIN_JOB_IMPROVEMENTS * MAIN_BEST_BYTES + _last_writes(e, LAST_EVERY_N_EPOCHS) * MAIN_LAST_BYTES
    assert total < 100e6, f"{total / 1e6:.0f} MB"
    assert max(MAIN_BEST_BYTES, MAIN_LAST_BYTES) <= 10e6


def _fit(cwd: Path, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FUSION_KILL_AT_STEP", None)
    if kill_at is not None:
        env["FUSION_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, str(TOY), "fit", "--trainer.max_epochs", "7", *EPOCH_SCHEDULE,
           "--checkpoint.last_every_n_epochs", str(KILL_TEST_INTERVAL), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_kill_loses_at_most_the_interval_and_resume_is_exact(tmp_path: Path) -> None:
    ref = _fit(tmp_path, "--trainer.default_root_dir", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # killed when step 29 starts (epoch 5, batch 5): the latest last.ckpt is the one after epoch 3 (step 18)
    killed = _fit(tmp_path, "--trainer.default_root_dir", "crash", kill_at=29)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = torch.load(tmp_path / "crash/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 18 and 29 - 18 <= KILL_TEST_INTERVAL * STEPS_PER_EPOCH
    # --resume takes last.ckpt even where best.ckpt (weights only, no optimizer state) was written later
    resumed = _fit(tmp_path, "--resume", "crash")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming crash from {Path('crash/checkpoints/last.ckpt')}" in resumed.stderr
    want = json.loads((tmp_path / "ref/metrics.json").read_text())
    got = json.loads((tmp_path / "crash/metrics.json").read_text())
    for split, groups in want.items():
        for group, row in groups.items():
            for name, value in row.items():
                assert got[split][group][name] == pytest.approx(value, abs=1e-6), (split, group, name)
    a = torch.load(tmp_path / "ref/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "crash/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 42
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_best_is_the_epoch_with_the_lowest_validation_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default monitor is val/loss (min): validation accuracy that saturates early (same speakers as training)
    must not freeze best.ckpt at an undertrained epoch. best.ckpt's last write is the epoch of the lowest val/loss
    in the run's own metrics.csv."""
    import csv

    monkeypatch.chdir(tmp_path)
    writes = _count_writes(monkeypatch)
    _toy_module().run(["fit", "--trainer.max_epochs", "7", "--trainer.default_root_dir", "run", *EPOCH_SCHEDULE])
    rows = [r for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r.get("val/loss")]
    rows = [r for r in rows if int(r["step"]) == (int(r["epoch"]) + 1) * STEPS_PER_EPOCH - 1]  # end of each epoch
    assert [int(r["epoch"]) for r in rows] == list(range(7))  # (the after-fit evaluation's row is left out)
    losses = [float(r["val/loss"]) for r in rows]
    best_epoch = min(range(7), key=losses.__getitem__)  # 0-based
    best_steps = [step for name, step, _ in writes if name == "best.ckpt"]
    assert best_steps[-1] == (best_epoch + 1) * STEPS_PER_EPOCH
    improved = [e for e in range(7) if losses[e] < min(losses[:e], default=float("inf"))]
    assert best_steps == [(e + 1) * STEPS_PER_EPOCH for e in improved]  # one write per new lowest loss
