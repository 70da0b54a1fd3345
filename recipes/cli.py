"""The ``fusion-zoo`` command, one dispatcher: ``fit | validate | test`` (LightningCLI, ``recipes.fit_cli``),
``predict | zoo | export | convert | serve | push`` (``zoo.cli``) and ``sweep`` (``recipes.sweep``). Each command
imports what it needs when it runs, so ``--help`` and the zoo commands never pay for Lightning.

``fusion-zoo fit`` with no arguments trains the default recipe (recipes/configs/default.yaml); every run writes
into its own directory ``runs/<subcommand>-<YYYYmmdd-HHMMSS>/`` (see docs/recipes.md).
"""

from __future__ import annotations

import sys
import time  # noqa: F401  (tests patch time.strftime through this module to pin run-folder names)
from collections.abc import Sequence
from typing import Any

from fusion_errors import FusionZooError

from ._cli_common import (  # noqa: F401  (re-exported: the command line's light helpers)
    LIGHTNING_COMMANDS,
    STEP_BUDGET,
    ZOO_COMMANDS,
    _check_ckpt,
    _init_names,
    _resume_args,
    _run_stamp,
    _version,
    check_flag_names,
    latest_checkpoint,
)
from ._quiet import configure_output, split_verbose
from .recipe import CONFIG_DIR, DEFAULT_CONFIG, resolve_config_args  # noqa: F401

# and, imported on first use, FusionCLI, FusionCheckpoint
__all__ = ["main", "CONFIG_DIR", "resolve_config_args", "MODULAR_COMMANDS"]

MODULAR_COMMANDS = ("decompose", "compose", "replace")  # recipes.modular_cli

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
  decompose  split a fused model into one module per class (docs/modularity.md)
  compose    build a fused model from class modules (fusion-zoo compose MODULE... --output MODEL)
  replace    swap one class's module: fusion-zoo replace MODEL --label L --from OTHER --output NEW

options:
  -h, --help     show this message; `fusion-zoo <command> --help` shows a command's options
  --version      show the version
  --verbose, -v  also show the libraries' info lines, warnings and progress bars (and a fit's model summary); by
                 default a run prints its progress bar, the cache lines and the result tables

recipes: {configs}
"""



def __getattr__(name: str) -> Any:
    """``recipes.cli.FusionCLI`` and the other Lightning-side names, imported on first use."""
    if name in ("FusionCLI", "FusionCheckpoint", "FusionTask"):
        from . import fit_cli

        return getattr(fit_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning(argv: list[str], datamodule_class: type | None = None) -> Any:
    """Run a Lightning command (``recipes.fit_cli``; imported here, not at start-up)."""
    from .fit_cli import run_lightning

    return run_lightning(argv, datamodule_class)


def _verify(*args: Any, **kwargs: Any) -> Any:
    """``recipes.verify.verify``, imported only when ``zoo verify`` runs."""
    from .verify import verify

    return verify(*args, **kwargs)


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
        return int(zoo_main(rest, table_predictor=_predict_table, verifier=_verify) or 0)
    if command == "sweep":
        from .sweep.run import main as sweep_main

        rest, verbose = split_verbose(args[1:])
        configure_output(verbose)  # the cells' Trainers are as quiet as a fit's
        try:
            return int(sweep_main(rest) or 0)
        except FusionZooError as e:  # a user mistake: one line naming the fix, not a traceback
            print(f"fusion-zoo sweep: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    if command in MODULAR_COMMANDS:
        from .modular_cli import main as modular_main

        rest, verbose = split_verbose(args[1:])
        configure_output(verbose)
        try:
            return int(modular_main(command, rest) or 0)
        except FusionZooError as e:  # a user mistake: one line naming the fix, not a traceback
            print(f"fusion-zoo {command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    print(f"fusion-zoo: unknown command {command!r}; choose one of "
          f"{', '.join([*LIGHTNING_COMMANDS, *ZOO_COMMANDS, 'sweep', *MODULAR_COMMANDS])} (see fusion-zoo --help).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
