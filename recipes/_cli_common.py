"""The light part of the ``fusion-zoo`` command line, shared by the dispatcher (``recipes.cli``) and the Lightning
commands (``recipes.fit_cli``): run folders, checkpoint lookup and flag-name checks. Nothing here imports torch or
Lightning at module level, so ``fusion-zoo --help``, ``zoo list`` and ``predict`` start fast.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_errors import CheckpointError, ConfigError

__all__ = ["LIGHTNING_COMMANDS", "ZOO_COMMANDS", "STEP_BUDGET", "check_encoder_columns", "check_flag_names",
           "latest_checkpoint"]

LIGHTNING_COMMANDS = ("fit", "validate", "test")
STEP_BUDGET = 3000  # fit's default --step_budget (docs/recipes.md "Schedule and stopping")
ZOO_COMMANDS = ("predict", "zoo", "export", "convert", "serve", "push")
_STAMP_ENV = "FUSION_ZOO_RUN_STAMP"  # shared with DDP child processes so every rank uses one run directory

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


def check_encoder_columns(encoders: Any, columns: Any) -> None:
    """``--model.encoders`` against the columns they will read: an encoder of another modality than its column's
    (``{"image": "tiny-text"}`` reads image paths as text) is one ConfigError naming the encoder, its modality and
    the column, before anything is built or read."""
    from encoders import encoder_modality

    if not isinstance(encoders, dict):
        return
    mapped = columns if isinstance(columns, dict) else {}
    for m, spec in sorted(encoders.items(), key=lambda kv: str(kv[0])):
        name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
        kind = encoder_modality(name) if isinstance(name, str) else None
        if kind is None or kind == m:
            continue
        column = f"column {mapped[m]!r}" if m in mapped else f"{m!r} column"
        raise ConfigError(f"--model.encoders gives the {m} {column} the encoder {name!r}, which encodes {kind}, not "
                          f"{m}; give it an {m} encoder (encoders.list_encoders()), or map a {kind} column "
                          f"with --data.columns '{{\"{kind}\": \"<column>\"}}'.")


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


