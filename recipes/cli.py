"""The ``fusion-zoo`` command: ``fit | validate | test`` (LightningCLI), ``predict | zoo | export | convert``
(``zoo.cli``) and ``sweep`` (``recipes.sweep``).

``fusion-zoo fit`` with no arguments trains the default recipe (recipes/configs/default.yaml); every run writes
into its own directory ``runs/<subcommand>-<YYYYmmdd-HHMMSS>/`` (see docs/recipes.md).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from encoders._atomic import atomic_write
from fusion_errors import CheckpointError, ConfigError, FusionZooError

from ._quiet import configure_output, split_verbose
from .cache import clean_stale_temps
from .callbacks import AtomicCheckpointIO, CachedFeatureThreads, FusionCheckpoint, ResumeCallback
from .metrics import format_table, write_metrics_json
from .recipe import CONFIG_DIR, DEFAULT_CONFIG, resolve_config_args
from .task import FusionTask

__all__ = ["main", "FusionCLI", "FusionCheckpoint", "CONFIG_DIR", "resolve_config_args"]

LIGHTNING_COMMANDS = ("fit", "validate", "test")
STEP_BUDGET = 3000  # fit's default --step_budget (docs/recipes.md "Schedule and stopping")
ZOO_COMMANDS = ("predict", "zoo", "export", "convert", "serve", "push")
_STAMP_ENV = "FUSION_ZOO_RUN_STAMP"  # shared with DDP child processes so every rank uses one run directory

USAGE = """usage: fusion-zoo <command> [options]

commands:
  fit        train a recipe, then test the best checkpoint, print the metrics table, write metrics.json
             and a fused model folder (default recipe: early fusion of pooled vectors, concat head, tridigits)
  validate   evaluate a model on the validation split (--ckpt_path run/checkpoints/best.ckpt)
  test       evaluate on the test split, fused and each modality alone
  predict    predict from raw text/image/audio with a saved or zoo model
  zoo        list and describe the pretrained fused models
  export     export a fused model (ONNX, TorchScript)
  convert    convert a Lightning .ckpt into a fused model folder
  serve      serve a model over HTTP: API + web page (docs/serve.md)
  push       upload a fused model folder to the Hugging Face Hub (docs/zoo.md)
  sweep      run a grid of recipes and collect their metrics

options:
  -h, --help     show this message; `fusion-zoo <command> --help` shows a command's options
  --version      show the version
  --verbose, -v  also show the libraries' info lines, warnings and progress bars (and a fit's model summary); by
                 default a run prints its progress bar, the cache lines and the result tables

recipes: {configs}
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusion-zoo")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _run_stamp(subcommand: str, create: bool = True) -> str:
    """``<subcommand>-<YYYYmmdd-HHMMSS>[-N]``, its folder under ``runs/`` created exclusively (so two runs started
    in the same second never share one); DDP children (LOCAL_RANK > 0) reuse the launcher's stamp."""
    inherited = os.environ.get(_STAMP_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return inherited
    base = f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        stamp = base if n == 1 else f"{base}-{n}"
        if not create:
            break
        try:
            (Path("runs") / stamp).mkdir(parents=True, exist_ok=False)  # atomic: exactly one process wins a name
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"runs/{base}-2 ... -999 are all taken; pass --trainer.default_root_dir <new folder>.")
    os.environ[_STAMP_ENV] = stamp
    return stamp


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written ``last*.ckpt`` under ``<run_dir>/checkpoints`` (None if there is none yet).

    Only ``last`` checkpoints carry the optimizer and loop states a resume needs; ``best.ckpt`` holds weights only
    and may be newer (the best is checked every epoch, last.ckpt written every few: recipes/callbacks.py)."""
    found = [p for p in Path(run_dir, "checkpoints").glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _check_ckpt(path: str) -> None:
    """``--ckpt_path`` must name a readable Lightning checkpoint (loaded with weights_only=True: no pickled code)."""
    import torch

    if path in ("last", "best", "hpc", "registry") or "://" in path:  # Lightning's own keywords / remote files
        return
    file = Path(path)
    if not file.is_file():
        hint = f"; resume a run with --resume {file.parent.parent}" if file.parent.name == "checkpoints" else ""
        raise CheckpointError(f"--ckpt_path {path} does not exist{hint} (--resume finds its latest checkpoint).")
    try:
        torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickled code, a truncated file, not a checkpoint at all
        raise CheckpointError(f"--ckpt_path {path} is not a readable Lightning checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); give a .ckpt written by fusion-zoo fit.") from e


def _init_names(cls: Any) -> list[str] | None:
    """The keyword names ``cls(...)`` takes, following ``**kwargs`` up to the parent class that receives them
    (None when no class in the chain names them all)."""
    import inspect

    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def check_flag_names(argv: Sequence[str], groups: dict[str, Any]) -> None:
    """A ``--group.name`` flag whose name ``group``'s class does not take is a one-line ConfigError naming the
    closest valid flag (jsonargparse would print its whole usage, then "unrecognized arguments")."""
    import difflib

    for arg in argv:
        if not arg.startswith("--") or "." not in arg:
            continue
        group, _, rest = arg[2:].split("=", 1)[0].partition(".")
        name = rest.split(".")[0].rstrip("+")  # --trainer.callbacks+=..., --model.head_options.x
        if group not in groups or name in ("class_path", "init_args", "help"):
            continue
        known = _init_names(groups[group])
        if known is None or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean --{group}.{close[0]}?" if close else f"see fusion-zoo fit --help for the {group} flags."
        raise ConfigError(f"unknown option --{group}.{name}; {hint}")


def _resume_args(argv: list[str]) -> list[str]:
    """``--resume RUN_DIR``: continue that run from its latest checkpoint, or start it if it has none yet."""
    out, i, run = [], 0, None
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv):
            run, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--resume="):
            run = argv[i].split("=", 1)[1]
        else:
            out.append(argv[i])
        i += 1
    if run is None:
        return argv
    if out[0] != "fit":
        raise ConfigError(f"--resume is for fit; give {out[0]} a checkpoint with --ckpt_path.")
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in out):
        raise ConfigError("give either --resume RUN_DIR or --ckpt_path FILE, not both.")
    out += ["--trainer.default_root_dir", run]
    last = latest_checkpoint(run)
    if last is None:
        print(f"fusion-zoo fit: no checkpoint in {run}/checkpoints yet; starting that run from the beginning.",
              file=sys.stderr)
        return out
    print(f"fusion-zoo fit: resuming {run} from {last}", file=sys.stderr)
    return [*out, "--ckpt_path", str(last)]


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
        if trainer_cfg.get("logger") in (None, True):  # log into the run directory itself, as CSV
            kwargs["logger"] = CSVLogger(trainer_cfg["default_root_dir"], name="", version="")
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
        """With no encoders named, choose them by the encoder probe (recipes/probe.py) and rebuild the task."""
        task = self.model
        if not (isinstance(task, FusionTask) and task.probe and callable(getattr(self.datamodule, "train_features",
                                                                                  None))):
            return
        from .probe import format_probe_table, probe_encoders

        dm = self.datamodule
        seed = self.config[self.subcommand].get("seed_everything")
        echo = print if self.trainer.is_global_zero else (lambda *_: None)
        report = probe_encoders(dm, task.cfg, lr=task.optim.lr, batch_size=int(getattr(dm, "batch_size", 128)),
                                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                                echo=lambda _: None)
        if not report.rows:
            return
        echo(format_probe_table(report))
        if report.choice != {m: s.name for m, s in task.cfg.encoders.items()}:
            args = {k: v for k, v in task.hparams.items() if k != "config"}
            task = FusionTask(**{**args, "encoders": dict(report.choice), "probe_encoders": False})
            self.model = task
        task.encoder_probe = report.to_dict()
        echo("encoders: " + ", ".join(f"{m} {n}" for m, n in sorted(report.choice.items())))

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

            report = ProbeReport(probe["choice"], probe["candidates"], probe["seconds"], probe["train_rows"],
                                 probe["val_rows"])
            notes = "Encoders chosen by the data (`fit`'s encoder probe):\n\n```\n" + format_probe_table(report) + \
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


def _check_logger(logger: Any) -> None:
    """``--trainer.logger TensorBoardLogger`` without tensorboard installed: one line naming the extra to install."""
    text = str(logger if not isinstance(logger, dict) else logger.get("class_path", ""))
    if "tensorboard" not in text.lower():
        return
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("--trainer.logger TensorBoardLogger needs tensorboard: pip install 'fusion-zoo[tensorboard]' "
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


def _lightning(argv: list[str], datamodule_class: type | None = None) -> FusionCLI:
    if datamodule_class is None:
        from .data import FusionDataModule

        datamodule_class = FusionDataModule
    argv, verbose = split_verbose(argv)
    configure_output(verbose)  # quiet by default: library chatter only with --verbose (recipes/_quiet.py)
    subcommand = argv[0]
    # `--init-from NAME` is the documented short form of `--model.init_from NAME`
    argv = [a.replace("--init-from", "--model.init_from", 1) if a.startswith("--init-from") else a for a in argv]
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


def _predict_table(*args: Any, **kwargs: Any) -> Any:
    """``recipes.predict_table.predict_table``, imported only when ``predict --table`` runs (it loads datasets)."""
    from .predict_table import predict_table

    return predict_table(*args, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fusion-zoo``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(configs=", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))))
        return 0
    command = args[0]
    if command == "--version":
        print(f"fusion-zoo {_version()}")
        return 0
    if command in LIGHTNING_COMMANDS:
        try:
            _lightning(args)
        except FusionZooError as e:  # a user mistake: one line naming the fix, not a traceback
            print(f"fusion-zoo {command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0
    if command in ZOO_COMMANDS:
        from zoo.cli import main as zoo_main

        rest, verbose = split_verbose(args)
        configure_output(verbose)  # no transformers weight-loading bar over a prediction
        return int(zoo_main(rest, table_predictor=_predict_table) or 0)
    if command == "sweep":
        from .sweep.run import main as sweep_main

        rest, verbose = split_verbose(args[1:])
        configure_output(verbose)  # the cells' Trainers are as quiet as a fit's
        try:
            return int(sweep_main(rest) or 0)
        except FusionZooError as e:  # a user mistake: one line naming the fix, not a traceback
            print(f"fusion-zoo sweep: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    print(f"fusion-zoo: unknown command {command!r}; choose one of "
          f"{', '.join([*LIGHTNING_COMMANDS, *ZOO_COMMANDS, 'sweep'])} (see fusion-zoo --help).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
