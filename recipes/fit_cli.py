"""``fusion-zoo fit | validate | test``: LightningCLI over :class:`recipes.task.FusionTask` and the data module.

Imported only when one of those commands runs (Lightning takes seconds to import); the dispatcher is
``recipes.cli``. ``fusion-zoo fit`` with no arguments trains the default recipe (recipes/configs/default.yaml);
every run writes into its own directory ``runs/<subcommand>-<YYYYmmdd-HHMMSS>/`` (see docs/recipes.md).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fusion_common.atomic import atomic_write
from fusion_errors import ConfigError

from ._cli_common import (
    LIGHTNING_COMMANDS,
    STEP_BUDGET,
    _check_ckpt,
    _resume_args,
    _run_stamp,
    check_encoder_columns,
    check_flag_names,
)
from ._quiet import configure_output, split_verbose
from .cache import clean_stale_temps
from .callbacks import AtomicCheckpointIO, CachedFeatureThreads, FusionCheckpoint, ResumeCallback
from .metrics import format_table, write_metrics_json
from .recipe import DEFAULT_CONFIG, resolve_config_args
from .task import FusionTask

__all__ = ["FusionCLI", "FusionCheckpoint", "run_lightning"]


def _data_modalities(data: Any) -> list[str] | None:
    """``data.modalities`` when the data module reports it (FusionDataModule does), else None."""
    return getattr(data, "modalities", None)


class FusionCLI(LightningCLI):
    """LightningCLI over :class:`FusionTask` and ``FusionDataModule`` with the recipe defaults.

    Adds configurable ``checkpoint`` (ModelCheckpoint) and ``early_stopping`` groups, links ``data.labels`` to
    ``model.labels``, logs to CSV in the run directory and, after ``fit``, evaluates the best checkpoint.
    """

    def __init__(self, *args: Any, recipe_command: str = "", **kwargs: Any) -> None:
        self.recipe_command = recipe_command
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        # the modalities the data has (a user's own data module may not say: then every default encoder)
        parser.link_arguments("data", "model.modalities", compute_fn=_data_modalities, apply_on="instantiate")
        parser.add_lightning_class_args(FusionCheckpoint, "checkpoint")
        parser.set_defaults({
            # the validation loss, not accuracy: validation often shares speakers/sources with training and its
            # accuracy saturates early (1.00 from epoch 3 on the held-out-speaker proxy), so an accuracy monitor
            # keeps an undertrained head (fused test 0.925 there vs 0.971 with val/loss: docs/heldout_speakers.md)
            "checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.save_last": True,
            "checkpoint.filename": "best", "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_argument("--step_budget", type=int | None, default=STEP_BUDGET,
                            help="fit: at most this many optimizer steps; trainer.max_epochs is lowered to the epochs "
                                 "that fit in it for the training split's size (null: no budget)")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.mode": "min",
                             "early_stopping.patience": 10})

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        _check_trainer(cfg.trainer, str(self.subcommand))
        check_encoder_columns(cfg.model.get("encoders"), (cfg.get("data") or {}).get("columns"))
        checkpoint = cfg.get("checkpoint") or {}
        for key in ("every_n_train_steps", "every_n_epochs", "last_every_n_epochs"):
            n = checkpoint.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n < 0:
                raise ConfigError(f"--checkpoint.{key} {n} must be >= 0 (0: off).")
        root = Path(str(cfg.trainer.get("default_root_dir") or "."))
        for folder in (root, root / "checkpoints"):  # temp files of saves killed in an earlier run
            clean_stale_temps(folder)
        if cfg.get("ckpt_path"):
            _check_ckpt(str(cfg.ckpt_path))
        _check_logger(cfg.trainer.get("logger"))
        _global_batch(cfg, str(self.subcommand))
        if cfg.trainer.strategy in ("ddp", "ddp_spawn"):
            # missing-modality embeddings, unrouted experts and the unused trunk branch get no gradient every step
            cfg.trainer.strategy = f"{cfg.trainer.strategy}_find_unused_parameters_true"
        if cfg.model.task == "regression":  # accuracy does not exist: watch the mean absolute error
            for group in ("checkpoint", "early_stopping"):
                if cfg[group].monitor == "val/fused/accuracy":
                    cfg[group].monitor, cfg[group].mode = "val/fused/mae", "min"

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        logger = trainer_cfg.get("logger")
        run_csv = CSVLogger(trainer_cfg["default_root_dir"], name="", version="")  # metrics.csv in the run folder
        if logger in (None, True):
            kwargs["logger"] = run_csv
        elif logger is not False:  # the CSV log first: the run folder stays trainer.log_dir, the curves read it
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(one, CSVLogger) for one in loggers):
                kwargs["logger"] = [run_csv, *loggers]
        if not trainer_cfg.get("plugins"):  # a kill during a save never corrupts the last good checkpoint
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        # Trainer.callbacks is assigned by its callback connector, not declared on the class (hence the ignore)
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        callbacks.append(ResumeCallback())  # exact mid-epoch resume (recipes/callbacks.py)
        callbacks.append(CachedFeatureThreads())  # tiny head steps run best on one thread
        return trainer

    def before_fit(self) -> None:
        self._probe_encoders()
        self._apply_step_budget()

    def _apply_step_budget(self) -> None:
        """Lower ``max_epochs`` to the epochs that fit in ``--step_budget`` steps: a few thousand rows get every
        epoch, a large table stops at the budget. Epochs, not ``trainer.max_steps``: Lightning resumes an
        epoch-end checkpoint wrongly when max_steps is set (validation skipped, early stopping then fails)."""
        budget = self.config[self.subcommand].get("step_budget")
        rows = getattr(self.datamodule, "train_size", None)
        batch = getattr(self.datamodule, "batch_size", None)
        epochs = self.trainer.fit_loop.max_epochs
        if not (isinstance(budget, int) and isinstance(rows, int) and isinstance(batch, int) and epochs
                and epochs > 0 and budget > 0):
            return
        per_epoch = math.ceil(rows / (batch * self.trainer.world_size))
        fit = max(1, budget // max(1, per_epoch))
        if fit < epochs:
            self.trainer.fit_loop.max_epochs = fit
            if self.trainer.is_global_zero:
                print(f"step budget: {fit} epochs of {per_epoch} steps (--step_budget {budget}; "
                      f"--trainer.max_epochs {epochs})")

    def _probe_encoders(self) -> None:
        """With no encoders named (or no head width set), choose them by the probe (recipes/probe.py) and rebuild
        the task."""
        task = self.model
        if not (isinstance(task, FusionTask) and (task.probe or task.probe_head)
                and callable(getattr(self.datamodule, "train_features", None))):
            return
        from .probe import format_probe_table, probe_encoders

        dm = self.datamodule
        seed = self.config[self.subcommand].get("seed_everything")
        echo = print if self.trainer.is_global_zero else (lambda *_: None)
        if getattr(dm, "streaming", False):  # the probe fits heads on cached features of the whole split
            echo("encoders: the probe is off while streaming; training the named (or default) encoders and head")
            return
        report = probe_encoders(dm, task.cfg, None if task.probe else {}, lr=task.optim.lr,
                                batch_size=int(getattr(dm, "batch_size", 128)),
                                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                                echo=lambda _: None, head=task.probe_head)
        if not report.rows:
            return
        echo(format_probe_table(report))
        if report.choice != {m: s.name for m, s in task.cfg.encoders.items()} or report.head:
            args = {k: v for k, v in task.hparams.items() if k != "config"}
            task = FusionTask(**{**args, **report.head, "encoders": dict(report.choice), "probe_encoders": False,
                                 "probe_head": False})
            self.model = task
        task.encoder_probe = report.to_dict()
        echo("encoders: " + ", ".join(f"{m} {n}" for m, n in sorted(report.choice.items()))
             + (f"; compact head ({', '.join(f'{k} {v}' for k, v in report.head.items())})" if report.head else ""))

    # after each subcommand ---------------------------------------------------------------------
    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") or None
        if best is None:
            rank_zero_warn("no best checkpoint was saved (fast_dev_run or no validation); evaluating the last weights.")
        trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        self._report(save_model=True, best=best)

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def _report(self, save_model: bool = False, best: str | None = None) -> None:
        """Print the metrics tables, write ``metrics.json`` (and the fused model) on rank 0."""
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective: call on every rank
        task: FusionTask = self.model
        metrics: dict[str, Any] = {s: task.results[s] for s in ("validation", "test") if s in task.results}
        if not self.trainer.is_global_zero:
            return
        for split, table in metrics.items():
            print("\n" + format_table(table, title=f"{split} metrics" + (f" (checkpoint {best})" if best else "")))
        probe = getattr(task, "encoder_probe", None)
        path = write_metrics_json(run_dir / "metrics.json", {**metrics, "encoder_probe": probe} if probe else metrics)
        rank_zero_info(f"metrics written to {path}")
        self._write_environment(run_dir / "environment.json")
        if save_model:
            self._save_model(run_dir / "model", metrics)

    def _write_environment(self, path: Path) -> None:
        """Record the seed and library versions of this run next to its metrics (for reruns and audits)."""
        from zoo._format import library_versions

        seed = self.config[self.subcommand].get("seed_everything")
        import numpy
        import pytorch_lightning

        libraries = {**library_versions(), "pytorch-lightning": pytorch_lightning.__version__,
                     "numpy": numpy.__version__}
        doc = {"seed": seed, "command": self.recipe_command, "libraries": libraries}
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")

    def _save_model(self, path: Path, metrics: dict[str, Any]) -> None:
        from zoo.hub import save_pretrained

        seed = self.config[self.subcommand].get("seed_everything")
        dataset = getattr(self.datamodule, "dataset", None)
        probe = getattr(self.model, "encoder_probe", None)
        notes = None
        if probe:
            from .probe import ProbeReport, format_probe_table

            report = ProbeReport.from_dict(probe)
            notes = "Encoders and head chosen by the data (`fit`'s probe):\n\n```\n" + format_probe_table(report) + \
                "\n```"
        save_pretrained(self.model.model, path, metrics=metrics, recipe_command=self.recipe_command,
                        dataset=dataset if isinstance(dataset, str) else None, notes=notes,
                        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
        print(f"fused model saved to {path} (load it with FusionModel.from_pretrained({str(path)!r}))")
        from .plots import fit_figures

        confusion = getattr(self.model, "test_confusion", None)
        figures = fit_figures(path.parent, list(self.model.model.config.labels),
                              None if confusion is None else confusion.numpy())
        if figures:
            print("figures: " + ", ".join(str(f) for f in figures))


def _world_size(trainer: Any) -> int:
    """Processes a data-parallel run starts: ``devices`` (an int or a list) times ``num_nodes``; 1 otherwise."""
    strategy = trainer.get("strategy")
    if not isinstance(strategy, str) and strategy is not None \
            or isinstance(strategy, str) and not strategy.startswith(("ddp", "fsdp", "deepspeed", "auto")):
        return 1
    devices = trainer.get("devices")
    if isinstance(devices, str):  # the command line gives "2", "0,1" or "auto"
        devices = int(devices) if devices.lstrip("-").isdigit() else [d for d in devices.split(",") if d.strip()] \
            if "," in devices else 1
    count = len(devices) if isinstance(devices, (list, tuple)) else devices if isinstance(devices, int) else 1
    if count == -1:
        import torch

        count = torch.cuda.device_count() if trainer.get("accelerator") in ("gpu", "cuda") else 1
    return max(1, int(count)) * max(1, int(trainer.get("num_nodes") or 1))


def _global_batch(cfg: Any, subcommand: str) -> None:
    """``--data.batch_size`` is the global batch: under DDP each of the N processes loads batch_size / N rows, so
    one optimizer step sees the same number of rows (and a run takes the same number of steps) as on one process."""
    n = _world_size(cfg.trainer)
    data = cfg.get("data")
    if n == 1 or data is None or not isinstance(data.get("batch_size"), int):
        return
    if data.batch_size % n:
        raise ConfigError(f"--data.batch_size {data.batch_size} (the global batch) does not split over {n} processes; "
                          f"give a multiple of {n}, e.g. {max(n, data.batch_size // n * n)}.")
    data.batch_size //= n
    rank_zero_info(f"{subcommand}: global batch {data.batch_size * n} = {n} processes x {data.batch_size} rows")


#: ``--trainer.logger NAME`` short names; a class name or path works too
LOGGER_NAMES = {"tensorboard": "pytorch_lightning.loggers.TensorBoardLogger",
                "csv": "pytorch_lightning.loggers.CSVLogger"}
_RUN_FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # loggers whose files can sit in the run folder itself


def _logger_args(argv: list[str], root: str) -> list[str]:
    """Expand ``--trainer.logger tensorboard`` (or ``csv``) to its class path and, unless ``save_dir`` is given,
    point TensorBoard and CSV loggers at the run folder ``root`` itself (no ``lightning_logs/version_N``), so every
    logger leaves one layout: event files beside ``metrics.json``, ``metrics.csv`` and the figures."""
    own_dir = any(a.split("=", 1)[0] in ("--trainer.logger.save_dir", "--trainer.logger.init_args.save_dir")
                  for a in argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--trainer.logger" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith("--trainer.logger="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            out.append(argv[i])
            i += 1
            continue
        value = LOGGER_NAMES.get(value.strip().lower(), value)
        out += ["--trainer.logger", value]
        if value.rsplit(".", 1)[-1] in _RUN_FOLDER_LOGGERS and not own_dir:
            out += ["--trainer.logger.save_dir", root, "--trainer.logger.name", "", "--trainer.logger.version", ""]
    if not own_dir and not any(a == "--trainer.logger" for a in out):
        given = _config_logger(argv)  # a recipe YAML's logger: TensorBoardLogger's save_dir is required
        if given is not None:
            out += ["--trainer.logger.save_dir", root]
            out += [f"--trainer.logger.{k}=" for k in ("name", "version") if k not in given]
    return out


def _config_logger(argv: list[str]) -> dict[str, Any] | None:
    """The init_args of a TensorBoard/CSV logger the last ``--config`` file names without a ``save_dir``."""
    import yaml

    found: dict[str, Any] | None = None
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.split("=", 1)[1] if a.startswith(
            "--config=") else None
        if path is None or not Path(path).is_file():
            continue
        try:
            cfg = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the CLI's own parser reports it
        logger = (cfg.get("trainer") or {}).get("logger") if isinstance(cfg, dict) else None
        if isinstance(logger, dict) and "trainer" in cfg:
            args = logger.get("init_args") or {}
            named = str(logger.get("class_path", "")).rsplit(".", 1)[-1] in _RUN_FOLDER_LOGGERS
            found = dict(args) if named and isinstance(args, dict) and not args.get("save_dir") else None
    return found


def _check_logger(logger: Any) -> None:
    """``--trainer.logger tensorboard`` without tensorboard installed: one line naming the extra to install."""
    text = str(logger if not isinstance(logger, dict) else logger.get("class_path", ""))
    if "tensorboard" not in text.lower():
        return
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("--trainer.logger tensorboard needs tensorboard: pip install 'fusion-zoo[tensorboard]' "
                          "(or leave out --trainer.logger for the CSV logs in the run folder).")


def _check_trainer(trainer: Any, subcommand: str) -> None:
    """Settings Lightning would accept and then misuse, or fail on with a traceback: one-line errors instead."""
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if subcommand == "fit" and epochs is not None and (epochs == 0 or epochs < -1 or (epochs == -1 and steps in
                                                                                        (None, -1))):
        raise ConfigError(f"--trainer.max_epochs {epochs} must be >= 1 (or -1 with --trainer.max_steps N); "
                          "with 0 the saved model would be untrained.")
    name = trainer.get("accelerator")
    if isinstance(name, str) and name != "auto":
        from pytorch_lightning.accelerators import AcceleratorRegistry

        registry = {n: AcceleratorRegistry[n]["accelerator"] for n in AcceleratorRegistry.available_accelerators()}
        present = sorted(n for n, acc in registry.items() if acc.is_available())
        known = name == "gpu" or name in registry
        if known and not (any(n in present for n in ("cuda", "mps")) if name == "gpu" else name in present):
            raise ConfigError(f"--trainer.accelerator {name} is not present on this machine; present: "
                              f"{', '.join(present)} (or use auto).")
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < -1 or devices == 0:
        raise ConfigError(f"--trainer.devices {devices} must be >= 1, -1 (all) or auto.")


#: what a finished run leaves in its folder: a new run there would replace them
RUN_OUTPUTS = ("metrics.json", "model", "config.yaml")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag VALUE`` or ``--flag=VALUE``), None when absent."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _check_fresh_root(argv: list[str]) -> None:
    """A ``--trainer.default_root_dir`` that already holds a run's outputs is refused (``--resume`` continues one,
    and so does ``--ckpt_path``)."""
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv):
        return
    for i, a in enumerate(argv):
        if a == "--trainer.default_root_dir" and i + 1 < len(argv):
            root = Path(argv[i + 1])
        elif a.startswith("--trainer.default_root_dir="):
            root = Path(a.split("=", 1)[1])
        else:
            continue
        found = [name for name in RUN_OUTPUTS if (root / name).exists()]
        if found:
            raise ConfigError(f"--trainer.default_root_dir {root} already holds a run ({', '.join(found)}); pass a new "
                              f"folder, or --resume {root} to continue that run.")


def run_lightning(argv: list[str], datamodule_class: type | None = None) -> FusionCLI:
    if datamodule_class is None:
        from .data import FusionDataModule

        datamodule_class = FusionDataModule
    argv, verbose = split_verbose(argv)
    configure_output(verbose)  # quiet by default: library chatter only with --verbose (recipes/_quiet.py)
    subcommand = argv[0]
    # `--init-from NAME` is the documented short form of `--model.init_from NAME`
    argv = [a.replace("--init-from", "--model.init_from", 1) if a.startswith("--init-from") else a for a in argv]
    _check_fresh_root(argv)
    argv = _resume_args(argv)
    from pytorch_lightning import Trainer

    groups: dict[str, Any] = {"model": FusionTask, "trainer": Trainer, "checkpoint": FusionCheckpoint,
                              "early_stopping": EarlyStopping}
    if not any(a.startswith("--data.class_path") or a == "--data" for a in argv):  # a user's own data module
        groups["data"] = datamodule_class
    check_flag_names(argv, groups)
    for i, a in enumerate(argv):  # checked before LightningCLI reads the file's hyperparameters at parse time
        if a == "--ckpt_path" and i + 1 < len(argv) or a.startswith("--ckpt_path="):
            _check_ckpt(argv[i + 1] if a == "--ckpt_path" else a.split("=", 1)[1])
    own_dir = any(a == "--trainer.default_root_dir" or a.startswith("--trainer.default_root_dir=") for a in argv)
    run_dir = Path("runs") / _run_stamp(subcommand, create=not own_dir)
    argv = _logger_args(argv, _flag_value(argv, "--trainer.default_root_dir") or str(run_dir))
    default_files = {"default_config_files": [str(DEFAULT_CONFIG)]}
    return FusionCLI(
        FusionTask,
        datamodule_class,
        args=resolve_config_args(argv),
        trainer_defaults={"default_root_dir": str(run_dir), "enable_model_summary": verbose},
        parser_kwargs={cmd: dict(default_files) for cmd in LIGHTNING_COMMANDS},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        recipe_command=shlex.join(["fusion-zoo", *argv]),
    )


