"""Lightning checkpoints hold what training changes; frozen encoders go by name + weights sha256, checked on restore."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from encoders import list_encoders, register_encoder
from fusion_errors import CheckpointError
from recipes.task import FusionTask
from zoo.convert import ENCODERS_KEY, convert, convert_checkpoint

_spec = importlib.util.spec_from_file_location("lean_toys", Path(__file__).with_name("test_module.py"))
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)  # type: ignore[union-attr]


class DriftEncoder(toys.FakeEncoder):
    """A "pretrained" fake whose weights change when ``SCALE`` does, as after an encoder package upgrade."""

    SCALE = 1.0

    def __init__(self) -> None:
        super().__init__(8)
        with torch.no_grad():
            self.lin.weight.mul_(type(self).SCALE)


if "drift-image" not in list_encoders():
    register_encoder("drift-image")(type("DriftImageEncoder", (DriftEncoder,), {"modality": "image"}))


def _fit(tmp_path: Path, **kw) -> tuple[FusionTask, Path]:
    task = toys.make_task(**kw)
    trainer = toys.tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(task, datamodule=toys.ToyDataModule())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return task, path


def test_checkpoint_holds_no_frozen_encoder_weights_and_restores_them(tmp_path: Path) -> None:
    task, path = _fit(tmp_path, encoders={"image": "drift-image", "text": {"name": "fake-text", "finetune": "full"}})
    ckpt = torch.load(path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert not any(k.startswith("model.encoders.image.") for k in keys)  # frozen: by reference
    assert {"model.encoders.text.lin.weight", "model.encoders.text.lin.bias"} <= keys  # trained: stored
    want = task.model.encoders["image"].weights_hash()
    assert ckpt[ENCODERS_KEY]["image"] == {"name": "drift-image", "stored": "reference", "weights_sha256": want}
    assert ckpt[ENCODERS_KEY]["text"]["stored"] == "full"
    assert len(ckpt["optimizer_states"]) == 1 and "loops" in ckpt  # what resuming needs is still there
    for back in (FusionTask.from_checkpoint(path), FusionTask.load_from_checkpoint(path, weights_only=True)):
        for k, v in task.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k
    # ckpt -> folder -> ckpt keeps working with lean checkpoints
    folder = convert_checkpoint(path, tmp_path / "folder")
    again = convert(folder, tmp_path / "again.ckpt")
    assert not any(k.startswith("model.encoders.image.") for k in torch.load(again, weights_only=True)["state_dict"])
    for k, v in task.state_dict().items():
        assert torch.equal(v, FusionTask.from_checkpoint(again).state_dict()[k]), k


def test_restore_refuses_a_changed_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = _fit(tmp_path, encoders={"image": "drift-image", "text": "fake-text"})
    monkeypatch.setattr(DriftEncoder, "SCALE", 1.5)  # the registry now builds other weights
    with pytest.raises(CheckpointError, match=r"image encoder 'drift-image' has weights sha256"):
        FusionTask.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="sha256"):
        FusionTask.load_from_checkpoint(path, weights_only=True)
    with pytest.raises(CheckpointError, match="sha256"):
        convert_checkpoint(path, tmp_path / "folder")
    task = toys.make_task(encoders={"image": "drift-image", "text": "fake-text"})
    trainer = toys.tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    with pytest.raises(CheckpointError, match="sha256"):  # resuming a fit checks it too
        trainer.fit(task, datamodule=toys.ToyDataModule(), ckpt_path=path)


def test_frozen_encoder_that_the_registry_cannot_rebuild_is_stored_in_full(tmp_path: Path) -> None:
    task = toys.make_task(encoders={"image": "drift-image", "text": "fake-text"})
    with torch.no_grad():  # frozen, but not the registry's weights (e.g. loaded from elsewhere)
        task.model.encoders["image"].lin.weight.add_(1.0)
    trainer = toys.tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(task, datamodule=toys.ToyDataModule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt[ENCODERS_KEY]["image"]["stored"] == "full" and "model.encoders.image.lin.weight" in ckpt["state_dict"]
    back = FusionTask.from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(back.model.encoders["image"].lin.weight, task.model.encoders["image"].lin.weight)
    assert isinstance(back.model.encoders["image"].lin, nn.Linear)
