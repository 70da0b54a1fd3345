"""A `fusion-zoo fit` killed with SIGKILL mid-epoch and resumed from last.ckpt ends exactly where an
uninterrupted run ends; checkpoints are written atomically, so a crash during a save keeps the previous one."""

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
from recipes.callbacks import AtomicCheckpointIO
from recipes.loader import EpochSampler, ResumableDataLoader

ROOT = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("toy_fit.py")


def _fit(cwd: Path, run_dir: str, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if kill_at is not None:
        env["FUSION_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, str(TOY), "fit", "--trainer.default_root_dir", run_dir, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref = _fit(tmp_path, "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # 24 rows / batch 4 = 6 steps per epoch, a checkpoint every 2 steps: step 9 starts in epoch 1, after the
    # step-8 checkpoint, so the resume point is mid-epoch (2 of 6 batches done)
    killed = _fit(tmp_path, "crash", kill_at=9)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "crash/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert not (tmp_path / "crash/metrics.json").exists()

    resumed = _fit(tmp_path, "crash", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = _flat(json.loads((tmp_path / "ref/metrics.json").read_text()))
    got = _flat(json.loads((tmp_path / "crash/metrics.json").read_text()))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    a = torch.load(tmp_path / "ref/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 18
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_atomic_save_keeps_the_previous_checkpoint_when_a_save_dies(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # the process is stopped while writing

    monkeypatch.setattr(callbacks.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_resumable_loader_order_depends_on_seed_and_epoch_only() -> None:
    loader = ResumableDataLoader(list(range(10)), batch_size=3, seed=5)
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler)
    sampler.set_epoch(1)
    torch.manual_seed(0)
    first = [b.tolist() for b in loader]
    torch.manual_seed(123)  # the global random state does not matter
    assert [b.tolist() for b in loader] == first
    assert sorted(sum(first, [])) == list(range(10)) and loader.state_dict() == {"epoch": 1, "batches": 4}
    loader.load_state_dict({"epoch": 1, "batches": 2})
    assert [b.tolist() for b in loader] == first[2:] and loader.state_dict()["batches"] == 4
    sampler.set_epoch(2)
    assert [b.tolist() for b in loader] != first
    loader.load_state_dict({"epoch": 1, "batches": 2})  # a stale position from another epoch is ignored
    sampler.set_epoch(2)
    assert len(list(loader)) == 4


def test_python_dash_m_recipes_cli_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "recipes.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.startswith("fusion-zoo ")
