"""The ``fusion-zoo`` command, one dispatcher over :data:`COMMANDS`: ``fit | validate | test`` (LightningCLI,
``recipes.fit_cli``), ``predict | zoo | export | convert | serve | push`` (``zoo.cli``), ``sweep``
(``recipes.sweep``) and ``decompose | compose | replace`` (``recipes.modular_cli``). ``--help`` is generated from
the table; each command imports what it needs when it runs, so ``--help`` and the zoo commands never pay for
Lightning.

``fusion-zoo fit`` with no arguments trains the default recipe (recipes/configs/default.yaml); every run writes
into its own directory ``runs/<subcommand>-<YYYYmmdd-HHMMSS>/`` (see docs/recipes.md).
"""

from __future__ import annotations

import sys
import textwrap
import time  # noqa: F401  (tests patch time.strftime through this module to pin run-folder names)
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
__all__ = ["main", "Command", "COMMANDS", "CONFIG_DIR", "resolve_config_args", "MODULAR_COMMANDS"]

MODULAR_COMMANDS = ("decompose", "compose", "replace")  # recipes.modular_cli


@dataclass(frozen=True)
class Command:
    """One ``fusion-zoo`` command: its line in ``--help`` and the function that runs it with the arguments after
    its name (imports happen inside ``run``, so start-up stays light)."""

    help: str
    run: Callable[[str, list[str]], int]


def _run_lightning(command: str, args: list[str]) -> int:
    _lightning([command, *args])
    return 0


def _end_process_group() -> None:
    """Tear down a DDP process group before the interpreter exits: left to the exit, gloo's worker threads can
    outlive Python and abort the process (SIGABRT, "terminate called without an active exception") after a
    fit that succeeded."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to end, and no torch import to pay for
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_zoo(command: str, args: list[str]) -> int:
    from zoo.cli import main as zoo_main

    rest, verbose = split_verbose([command, *args])
    configure_output(verbose)  # no transformers weight-loading bar over a prediction
    return int(zoo_main(rest, table_predictor=_predict_table, verifier=_verify) or 0)


def _run_sweep(command: str, args: list[str]) -> int:
    from .sweep.run import main as sweep_main

    rest, verbose = split_verbose(args)
    configure_output(verbose)  # the cells' Trainers are as quiet as a fit's
    return int(sweep_main(rest) or 0)


def _run_modular(command: str, args: list[str]) -> int:
    from .modular_cli import main as modular_main

    rest, verbose = split_verbose(args)
    configure_output(verbose)
    return int(modular_main(command, rest) or 0)


#: every command, in ``--help`` order; a new command is one entry here
COMMANDS: dict[str, Command] = {
    "fit": Command("train a recipe, then test the best checkpoint, print the metrics table, write metrics.json and a "
                   "fused model folder (default recipe: early fusion of pooled vectors, concat head, tridigits)",
                   _run_lightning),
    "validate": Command("evaluate a model on the validation split (--ckpt_path run/checkpoints/best.ckpt)",
                        _run_lightning),
    "test": Command("evaluate on the test split, fused and each modality alone", _run_lightning),
    "predict": Command("predict from raw text/image/audio with a saved or zoo model", _run_zoo),
    "zoo": Command("list, describe and verify the pretrained fused models", _run_zoo),
    "export": Command("export a fused model (ONNX, TorchScript)", _run_zoo),
    "convert": Command("convert a Lightning .ckpt into a fused model folder", _run_zoo),
    "serve": Command("serve a model over HTTP: API + web page (docs/serve.md)", _run_zoo),
    "push": Command("upload a fused model folder to the Hugging Face Hub (docs/zoo.md)", _run_zoo),
    "sweep": Command("run a grid of recipes and collect their metrics", _run_sweep),
    "decompose": Command("split a fused model into one module per class (docs/modularity.md)", _run_modular),
    "compose": Command("build a fused model from class modules (fusion-zoo compose MODULE... --output MODEL)",
                       _run_modular),
    "replace": Command("swap one class's module: fusion-zoo replace MODEL --label L --from OTHER --output NEW",
                       _run_modular),
}
assert set(LIGHTNING_COMMANDS) | set(ZOO_COMMANDS) | set(MODULAR_COMMANDS) | {"sweep"} == set(COMMANDS)


def _usage() -> str:
    """``fusion-zoo --help``: generated from :data:`COMMANDS`, so every command is listed."""
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: fusion-zoo <command> [options]", "", "commands:"]
    for name, command in COMMANDS.items():
        body = textwrap.wrap(command.help, 116 - width)
        lines += [f"  {name.ljust(width)}{body[0]}", *(" " * (width + 2) + more for more in body[1:])]
    return "\n".join([*lines, "", """options:
  -h, --help     show this message; `fusion-zoo <command> --help` shows a command's options
  --version      show the version
  --verbose, -v  also show the libraries' info lines, warnings and progress bars (and a fit's model summary); by
                 default a run prints its progress bar, the cache lines and the result tables

recipes: {configs}
"""])


USAGE = _usage()


def __getattr__(name: str) -> Any:
    """``recipes.cli.FusionCLI`` and the other Lightning-side names, imported on first use."""
    if name in ("FusionCLI", "FusionCheckpoint", "FusionTask"):
        from . import fit_cli

        return getattr(fit_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning(argv: list[str], datamodule_class: type | None = None) -> Any:
    """Run a Lightning command (``recipes.fit_cli``; imported here, not at start-up)."""
    from .fit_cli import run_lightning

    try:
        return run_lightning(argv, datamodule_class)
    finally:
        _end_process_group()


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
    if command in COMMANDS:
        try:
            return COMMANDS[command].run(command, args[1:])
        except FusionZooError as e:  # a user mistake: one line naming the fix, not a traceback
            print(f"fusion-zoo {command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    print(f"fusion-zoo: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see fusion-zoo --help).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
