"""Issue 14 (6, 8): every invalid setting is refused when the config is made, with one line naming the allowed
range (CLI: one line on stderr, exit status 2), instead of training wrongly or ending in a traceback."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import encoders
from fusion_errors import ConfigError, InputError
from recipes.task import FusionTask
from zoo.config import FusionModelConfig
from zoo.model import FusionModel


@pytest.fixture()
def toy_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., int]:
    """``cli.main`` with the reliability toy data module (tests/reliability/toy_fit.py), runs in ``tmp_path``."""
    from recipes import cli

    spec = importlib.util.spec_from_file_location("reliability_toy_settings", Path(__file__).with_name("toy_fit.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    real = cli._lightning
    monkeypatch.setattr(cli, "_lightning", lambda argv: real(
        [argv[0], *toy.TOY_ARGS, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
         *argv[1:]], datamodule_class=toy.ToyRawData))
    return cli.main


def _absent_accelerator() -> str:
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        return "gpu"
    return "tpu"  # the test machines have no TPU


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


CLI_CASES = {
    "negative_lr": (["--model.lr", "-1"], "lr=-1.0 must be a finite number > 0"),
    "zero_encoder_lr": (["--model.encoder_lr", "0"], "encoder_lr=0.0 must be a finite number > 0"),
    "dropout_1.5": (["--model.dropout", "1.5"], r"dropout=1.5 must be in \[0, 1\)"),
    "max_epochs_0": (["--trainer.max_epochs", "0"], "max_epochs 0 must be >= 1"),
    "absent_accelerator": (["--trainer.accelerator", _absent_accelerator()], "is not present on this machine; "
                                                                             "present: cpu"),
    "unknown_head_option": (["--model.head_options", '{"nope": 1}'],
                            r"unknown fusion head option\(s\) \['nope'\] for 'concat'; accepted: "),
    "unknown_encoder_option": (["--model.encoders", '{"image": {"name": "tiny-image", "options": {"size": 3}}}'],
                               r"unknown encoder option\(s\) \['size'\] for 'tiny-image'; accepted: \["),
    "missing_ckpt": (["--ckpt_path", "nowhere/checkpoints/last.ckpt"], "does not exist; resume a run with --resume"),
    # issue 30 (8): these three were tracebacks; the same values in a checkpoint give the same message
    "head_option_wrong_type": (["--model.fusion_head", "gating", "--model.head_options", '{"floor": "high"}'],
                               "fusion head 'gating': option floor='high' must be float, not str"),
    "negative_checkpoint_interval": (["--checkpoint.every_n_train_steps", "-1"],
                                     "--checkpoint.every_n_train_steps -1 must be >= 0"),
    "negative_encoder_width": (["--model.encoders", '{"image": "rel-fake-image", "text": {"name": "tiny-text", '
                                                    '"options": {"hidden_size": -1}}}'],
                               r"encoder 'tiny-text': option hidden_size=-1 must be in 1\.\.16384"),
    "encoder_layers_100000": (["--model.encoders", '{"image": "rel-fake-image", "text": {"name": "tiny-text", '
                                                   '"options": {"num_layers": 100000}}}'],
                              r"encoder 'tiny-text': option num_layers=100000 must be in 0\.\.64"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_setting_is_one_line_exit_2(toy_main: Callable[..., int], capsys: pytest.CaptureFixture,
                                        case: str) -> None:
    args, needle = CLI_CASES[case]
    assert toy_main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert pytest.importorskip("re").search(needle, err), err


def test_cli_pickled_ckpt_path_is_refused_without_running_it(toy_main: Callable[..., int], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    assert toy_main(["fit", "--ckpt_path", str(evil)]) == 2
    captured = capsys.readouterr()
    assert "not a readable Lightning checkpoint" in captured.err and "pwned" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(("change", "needle"), [
    ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ({"late_loss_weight": float("nan")}, "late_loss_weight=nan must be a finite number >= 0"),
    ({"late_loss_weight": float("inf")}, "late_loss_weight=inf must be a finite number >= 0"),
    ({"late_loss_weight": -1.0}, "late_loss_weight=-1.0 must be a finite number >= 0"),
    ({"labels": ("a", "b", "a")}, r"labels 'a' appear more than once among the 3 labels"),
    ({"fusion_head": "gating", "head_options": {"temperature": 2}},
     r"unknown fusion head option\(s\) \['temperature'\]"),
    ({"encoders": {"text": {"name": "tiny-text", "options": {"hidden": 8}}}},
     r"unknown encoder option\(s\) \['hidden'\] for 'tiny-text'; accepted: \['hidden_size'"),
    ({"encoders": {"text": {"name": "tiny-text", "finetune": "last_n", "last_n": 0}}}, "last_n=0 .* must be >= 1"),
])
def test_config_refuses_out_of_range_settings(change: dict, needle: str) -> None:
    kwargs = {"encoders": {"text": "tiny-text"}, "labels": ("a", "b"), **change}
    with pytest.raises(ConfigError, match=needle):
        FusionModelConfig(**kwargs)


def test_unknown_encoder_options_name_the_accepted_ones_at_create_encoder() -> None:
    accepted = r"accepted: \['hidden_size', 'num_layers', 'num_heads', 'max_length', 'max_windows'\]"
    with pytest.raises(ConfigError, match=accepted):
        encoders.create_encoder("tiny-text", hiden_size=8)  # was TypeError: unexpected keyword argument


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
    ({"lr": float("nan")}, "lr=nan must be"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 must be in \[0, 1\)"),
])
def test_task_refuses_bad_optimizer_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FusionTask(encoders={"text": "tiny-text"}, labels=["a", "b"], hidden_dim=8, **kwargs)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_predict_refuses_non_positive_batch_sizes(batch_size: int) -> None:
    model = FusionModel(FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8))
    with pytest.raises(InputError, match="must be a positive integer"):  # -1 returned [] and 0 a traceback
        model.predict(text=["hello"], batch_size=batch_size)


@pytest.mark.parametrize("flag, suggestion", [
    (["--model.hidden_dimm", "3"], "--model.hidden_dim"),
    (["--trainer.max_epoch", "1"], "--trainer.max_epochs"),
    (["--data.batchsize=8"], "--data.batch_size"),
    (["--checkpoint.last_every_n_epoch", "2"], "--checkpoint.last_every_n_epochs"),
])
def test_misspelt_fit_flag_is_one_line_naming_the_close_match(flag: list[str], suggestion: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """jsonargparse printed its 110-line usage before "unrecognized arguments"; now one line and exit 2."""
    from recipes.cli import main

    assert main(["fit", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"did you mean {suggestion}?" in err, err


def test_config_validation_is_linear_in_the_number_of_labels() -> None:
    """Issue 30 (3): 300,000 labels hung the loader (a quadratic duplicate check); now they validate at once, and a
    duplicate among them is named without printing the whole list."""
    from fusion_errors import ConfigError
    from zoo.config import FusionModelConfig

    labels = tuple(f"class-{i}" for i in range(300_000))
    FusionModelConfig(encoders={"text": "tiny-text"}, labels=labels, hidden_dim=8)  # was > 240 s, now well under 1
    with pytest.raises(ConfigError, match="'class-7' appear more than once among the 300001 labels") as e:
        FusionModelConfig(encoders={"text": "tiny-text"}, labels=(*labels, "class-7"), hidden_dim=8)
    assert len(str(e.value)) < 300
