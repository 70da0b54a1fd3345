"""Modular training in FusionTask (every head x stage, as the sweep's cells run it) and the decompose / compose /
replace commands on the bundled tridigits data with tiny encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from encoders import ModalityOutput
from fusion_heads import list_fusion_heads
from recipes import cli
from recipes.sweep.train import CachedFeatureTask, SplitFeatures, feature_loader
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

WEIGHTS = {"affinity": 1.0, "dispersion": 1.0, "compactness": 0.1}


def split(n: int, seed: int) -> SplitFeatures:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    out = {}
    for m, d in (("image", 6), ("text", 8)):
        tokens = torch.randn(n, 2, d, generator=g) + torch.nn.functional.one_hot(y, d).float()[:, None]  # [N, 2, D]
        out[m] = ModalityOutput(tokens, torch.ones(n, 2, dtype=torch.bool), tokens.mean(1))
    return SplitFeatures(out, y)


@pytest.mark.parametrize("stage", ["early", "late", "hybrid"])
@pytest.mark.parametrize("head", list_fusion_heads())
def test_every_head_and_stage_trains_with_the_objectives(head: str, stage: str) -> None:
    pl.seed_everything(0, verbose=False)
    cfg = FusionModelConfig(encoders={"image": "tiny-image", "text": "tiny-text"}, labels=("a", "b", "c"),
                            fusion_head=head, stage=stage, hidden_dim=16, fuse_tokens=stage != "late",
                            modularity=WEIGHTS)
    train = split(48, 0)
    task = CachedFeatureTask(cfg.to_dict(), train.embed_dims)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, train_dataloaders=feature_loader(train, 16, True))
    logged = trainer.callback_metrics
    for key in ("affinity", "dispersion", "compactness"):
        value = float(logged[f"train/modularity/{key}"])
        assert 0.0 <= value <= 1.0 + 1e-6, (key, value)
    assert torch.isfinite(logged["train/loss"])


def test_objectives_add_to_the_loss_only_when_set() -> None:
    cfg = FusionModelConfig(encoders={"image": "tiny-image", "text": "tiny-text"}, labels=("a", "b", "c"),
                            hidden_dim=16, dropout=0.0, modality_dropout=0.0)
    train = split(16, 1)
    batch = train.batch(torch.arange(16))
    losses = []
    for weights in (None, WEIGHTS):
        torch.manual_seed(0)
        task = CachedFeatureTask(cfg.replace(modularity=weights).to_dict(), train.embed_dims)
        losses.append(float(task.training_step(batch, 0)))
        out = task.model(batch["inputs"])
        assert {k for k in out.units if "." not in k} == {"proj_image", "proj_text", "head_hidden", "head",
                                                          "trunk_hidden", "trunk"}
    assert losses[1] > losses[0]  # the same weights: the objectives' weighted sum comes on top


def test_decompose_compose_replace_commands(tmp_path: Path, capsys) -> None:
    """Module folders, a report whose composed accuracy matches the original at coverage 1, a composed and a
    repaired model that load; compose refuses modules over other encoders with one line and exit 2."""
    data = ["--data.max_samples", "24", "--data.cache_dir", str(tmp_path / "cache")]
    torch.manual_seed(0)
    pixels = {"image": "pixels"}  # weightless, so every build has the same sha256 (modules name it and its hash)
    cfg = FusionModelConfig(encoders=pixels, labels=tuple(str(i) for i in range(10)), hidden_dim=16)
    FusionModel(cfg).save_pretrained(tmp_path / "model")
    assert cli.main(["decompose", str(tmp_path / "model"), "--output", str(tmp_path / "mods"), "--coverage", "1.0",
                     "--weight-coverage", "1.0", *data]) == 0
    report = json.loads((tmp_path / "mods" / "decomposition.json").read_text())
    assert report["test_accuracy_composed"] == report["test_accuracy_original"]
    assert 0 < report["mean_weight_share"] <= 1 and 0 <= report["mean_jaccard"] <= 1
    assert {"head_hidden", "trunk_hidden"} <= set(report["layer_jaccard"]) and report["rows"] == "all"
    folders = sorted(p for p in (tmp_path / "mods").iterdir() if p.is_dir())
    assert [p.name for p in folders] == [str(i) for i in range(10)]
    assert cli.main(["compose", *map(str, folders[:3]), "--output", str(tmp_path / "sub"), *data]) == 0
    sub = FusionModel.from_pretrained(tmp_path / "sub")
    assert sub.config.labels == ("0", "1", "2")
    assert cli.main(["replace", str(tmp_path / "model"), "--label", "3", "--from", str(folders[3]),
                     "--output", str(tmp_path / "fixed")]) == 0
    capsys.readouterr()
    assert cli.main(["replace", str(tmp_path / "model"), "--label", "3", "--from", str(folders[3]),
                     "--output", str(tmp_path / "fixed2"), *data]) == 0
    assert "no other class down more than 0.5 points" in capsys.readouterr().out
    assert FusionModel.from_pretrained(tmp_path / "fixed").config.labels == cfg.labels
    other = {"image": {"name": "pixels", "options": {"image_size": 14}}}
    FusionModel(cfg.replace(encoders=other)).save_pretrained(tmp_path / "text")
    capsys.readouterr()
    assert cli.main(["decompose", str(tmp_path / "text"), "--output", str(tmp_path / "tmods"), *data]) == 0
    code = cli.main(["compose", str(folders[0]), str(tmp_path / "tmods" / "1"), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ModuleError" in err and "reads other encoders" in err and "\n" not in err
