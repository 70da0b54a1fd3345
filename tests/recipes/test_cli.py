"""The ``fusion-zoo`` CLI: dispatcher, LightningCLI runs, run directory layout, metrics.json, YAML recipes, DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from recipes import cli
from recipes.task import FusionTask
from zoo.model import FusionModel

ROOT = Path(__file__).resolve().parents[2]
TOYS = Path(__file__).with_name("test_module.py")  # fake encoders and the toy data module


def _load_toys():
    spec = importlib.util.spec_from_file_location("recipes_cli_toys", TOYS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ToyDataModule = _load_toys().ToyDataModule
RECIPES = ["early_fusion.yaml", "late_fusion.yaml", "hybrid_fusion.yaml"]
TOY_MODEL = ["--model.encoders", '{"image": "fake-image", "text": "fake-text"}', "--model.hidden_dim", "16"]
TOY_TRAINER = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


def run_toy(tmp_path: Path, *args: str, command: str = "fit") -> cli.FusionCLI:
    return cli._lightning([command, "--trainer.default_root_dir", str(tmp_path), *TOY_MODEL, *TOY_TRAINER, *args],
                          datamodule_class=ToyDataModule)


def test_help_version_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "zoo", "export", "convert", "sweep"):
        assert f"\n  {command} " in out
    assert "early_fusion.yaml" in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fusion-zoo ")
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_bare_config_names_resolve_to_packaged_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = cli.resolve_config_args(["fit", "--config", "early_fusion.yaml", "-c", "late_fusion"])
    assert resolved[2] == str(cli.CONFIG_DIR / "early_fusion.yaml")
    assert resolved[4] == str(cli.CONFIG_DIR / "late_fusion.yaml")
    (tmp_path / "early_fusion.yaml").write_text("model: {}\n")
    assert cli.resolve_config_args(["fit", "--config=early_fusion.yaml"]) == ["fit", "--config=early_fusion.yaml"]


def test_fit_writes_run_directory_metrics_and_checkpoints(tmp_path, capsys):
    run = run_toy(tmp_path, "--model.stage", "late", "--model.fusion_head", "gating", "--model.lr", "0.01")
    assert run.model.cfg.fusion_head == "gating" and run.model.hparams.lr == 0.01
    assert run.model.cfg.labels == tuple(ToyDataModule().labels)  # linked from data.labels
    for name in ("config.yaml", "metrics.json", "metrics.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test"}
    assert set(metrics["test"]) == {"fused", "image", "text"}
    for group in ("fused", "image", "text"):
        assert {"accuracy", "macro_f1", "auroc", "n"} <= set(metrics["test"][group])
        assert 0.0 <= metrics["test"][group]["accuracy"] <= 1.0
    assert "head_accuracy" in metrics["test"]["text"] and "accuracy" in metrics["validation"]["fused"]
    out = capsys.readouterr().out
    table = out[out.index("test metrics"):]
    assert [line.split()[0] for line in table.splitlines()[3:6]] == ["fused", "text", "image"]
    ckpt = torch.load(tmp_path / "checkpoints/best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["fusion_head"] == "gating"
    fused = FusionModel.from_pretrained(tmp_path / "model")  # the fused model folder
    assert fused.config == run.model.cfg


def test_test_subcommand_rebuilds_the_model_from_a_checkpoint(tmp_path):
    run_toy(tmp_path / "fit", "--model.stage", "early")
    ckpt = tmp_path / "fit" / "checkpoints" / "best.ckpt"
    run = cli._lightning(["test", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "test"),
                          "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"],
                         datamodule_class=ToyDataModule)
    assert run.model.cfg.stage == "early" and run.model.cfg.hidden_dim == 16  # from the checkpoint, not the YAML
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert set(metrics) == {"test"} and "accuracy" in metrics["test"]["fused"]


def test_fast_dev_run_works_without_a_best_checkpoint(tmp_path):
    run = run_toy(tmp_path, "--trainer.fast_dev_run", "true", "--model.stage", "hybrid")
    assert "fused" in run.model.results["test"]


@pytest.mark.parametrize("recipe", ["default.yaml", *RECIPES])
def test_recipe_model_sections_build_and_train(recipe):
    model_args = yaml.safe_load((cli.CONFIG_DIR / recipe).read_text())["model"]
    model_args["encoders"] = {"image": "fake-image", "text": "fake-text"}
    task = FusionTask(labels=["a", "b", "c"], **{**model_args, "hidden_dim": 16})
    assert task.cfg.stage == {"early_fusion.yaml": "early", "hybrid_fusion.yaml": "hybrid",
                              "default.yaml": "early"}.get(recipe, "late")
    # the default fuses one pooled vector per modality; the early/hybrid recipes fuse token sequences
    assert task.cfg.needs_tokens == (recipe in ("early_fusion.yaml", "hybrid_fusion.yaml"))
    present = torch.ones(4, dtype=torch.bool)
    inputs = {m: {"x": torch.randn(4, 4), "present": present} for m in ("image", "text")}
    batch = {"inputs": inputs, "labels": torch.arange(4) % 3}
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.model.classifier.weight.grad is not None


@pytest.mark.parametrize("recipe", RECIPES)
def test_yaml_recipes_run_end_to_end(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = '{"audio": "mel-cnn", "image": "tiny-image", "text": "tiny-text"}'
    code = cli.main(["fit", "--config", recipe, "--model.encoders", tiny, "--model.hidden_dim", "32",
                     "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                     "--data.max_samples", "16", "--trainer.default_root_dir", "run"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"fused", "text", "image", "audio"}
    assert 0.0 <= metrics["test"]["fused"]["accuracy"] <= 1.0


DDP_SCRIPT = """
import importlib.util, sys
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("toys", {toys!r})
toys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toys)
from recipes import cli
cli._lightning(sys.argv[1:], datamodule_class=toys.ToyDataModule)
"""


def test_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(toys=str(TOYS), root=str(ROOT))))
    args = ["fit", *TOY_MODEL, *TOY_TRAINER,
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("fit-")  # both ranks share one run directory
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert {"fused", "image", "text"} <= set(metrics["test"])
    assert proc.stdout.count("test metrics") == 1  # only rank 0 reports


def test_a_lightning_command_ends_its_process_group_even_when_it_fails(tmp_path):
    """Left to the interpreter's exit, a gloo group's threads can abort a process whose fit succeeded."""
    import torch.distributed as dist

    from fusion_errors import FusionZooError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises((FusionZooError, SystemExit)):
            cli._lightning(["fit", "--model.no_such_flag", "1"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_zoo_and_sweep_commands_are_dispatched(monkeypatch):
    import recipes.sweep.run
    import zoo.cli

    seen = []
    readers = []

    def zoo_main(argv, table_predictor=None, verifier=None):
        readers.append(table_predictor)
        readers.append(verifier)
        seen.append(("zoo", argv))
        return 0

    monkeypatch.setattr(zoo.cli, "main", zoo_main)
    monkeypatch.setattr(recipes.sweep.run, "main", lambda argv: seen.append(("sweep", argv)) or 3)
    assert cli.main(["export", "runs/x/model", "--format", "onnx", "-v"]) == 0  # --verbose is the command's own
    assert cli.main(["sweep", "--heads", "concat"]) == 3
    assert seen == [("zoo", ["export", "runs/x/model", "--format", "onnx"]), ("sweep", ["--heads", "concat"])]
    assert callable(readers[0]) and callable(readers[1])  # predict --table's reader, zoo verify: the recipes layer


def test_init_from_swaps_the_head_and_trains_only_it(tmp_path, monkeypatch):
    """`fusion-zoo fit --init-from RUN/model --model.fusion_head gating`: encoders and late heads keep their weights."""
    from zoo.model import FusionModel

    monkeypatch.chdir(tmp_path)
    tiny = '{"image": "tiny-image", "text": "tiny-text"}'
    common = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--data.max_samples", "16"]
    assert cli.main(["fit", "--model.encoders", tiny, "--model.hidden_dim", "32", "--model.stage", "late",
                     "--model.fusion_head", "concat", *common, "--trainer.default_root_dir", "base"]) == 0
    before = FusionModel.from_pretrained(tmp_path / "base" / "model")
    assert cli.main(["fit", "--init-from", str(tmp_path / "base" / "model"), "--model.fusion_head", "gating",
                     *common, "--trainer.default_root_dir", "swapped"]) == 0
    after = FusionModel.from_pretrained(tmp_path / "swapped" / "model")
    assert after.config.fusion_head == "gating"
    for name in ("encoders", "late_encoders", "late_heads"):
        old, new = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), f"{name} changed during a head-only fine-tune"


def test_step_budget_lowers_the_epochs_to_what_fits(tmp_path, capsys) -> None:
    import csv

    for split, n in (("train", 40), ("validation", 8), ("test", 8)):
        with (tmp_path / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows([[f"word {i % 2} {i}", "ab"[i % 2]] for i in range(n)])
    run = tmp_path / "run"
    code = cli.main(["fit", "--data.data_dir", str(tmp_path), "--data.batch_size", "8", "--step_budget", "12",
                     "--trainer.max_epochs", "5", "--model.encoders", '{"text": "tiny-text"}', "--model.hidden_dim",
                     "8",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)])
    assert code == 0
    assert "step budget: 2 epochs of 5 steps (--step_budget 12; --trainer.max_epochs 5)" in capsys.readouterr().out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10  # 2 epochs x 5 steps, not 5 epochs
    assert json.loads((run / "metrics.json").read_text())["test"]["fused"]["n"] == 8
    assert bool(FusionModel.from_pretrained(run / "model").feature_norm["text"].fitted)  # set when the fit started


def test_the_dispatcher_imports_lightning_only_for_the_lightning_commands() -> None:
    code = ("import sys, recipes.cli as c; c.main(['--help']); "
            "assert 'pytorch_lightning' not in sys.modules, 'fusion-zoo --help imported Lightning'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ,
                                                                                       "HF_HUB_OFFLINE": "1"})
