"""Quiet by default: a ``fusion-zoo fit`` prints the progress bar, the project's own lines (feature cache, data,
metrics) and the result tables; library chatter a user cannot act on shows only with ``--verbose``.

Hidden unless verbose: Lightning's and torchmetrics' warnings (LightningCLI's "args parameter ... not
recommended", "Found N module(s) in eval mode", the log-interval hint, deprecations inside Lightning), Lightning's
info lines (seed, GPU/TPU availability, the litlogger tip, "Restoring states ..."), the model summary (its FLOPs
column reads 0 for this model) and transformers' weight-loading progress bars. Warnings raised by fusion-zoo's
own code and every error still show.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

__all__ = ["VERBOSE_FLAGS", "split_verbose", "configure_output", "is_verbose"]

VERBOSE_FLAGS = ("--verbose", "-v")
_PROJECT = Path(__file__).resolve().parents[1]
_OWN = tuple(str(_PROJECT / pkg) for pkg in ("recipes", "zoo", "encoders", "fusion_heads"))
_LIBRARY_WARNINGS = r"(pytorch_lightning|lightning_fabric|lightning_utilities|lightning|torchmetrics)(\..*)?$"
_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without the ``--verbose``/``-v`` flags, and whether one was given."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    return rest, len(rest) != len(argv)


class _OwnInfoOnly(logging.Filter):
    """Passes warnings and errors, and info lines logged from fusion-zoo's own code (``rank_zero_info`` records
    the caller's file); drops the libraries' info lines while ``enabled``."""

    enabled = True

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.enabled or record.levelno >= logging.WARNING:
            return True
        return record.pathname.startswith(_OWN)


_FILTER = _OwnInfoOnly()


def configure_output(verbose: bool) -> None:
    """Quiet (default) or verbose output for a Lightning run in this process (idempotent, reversible)."""
    _FILTER.enabled = not verbose
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for handler in [*logger.handlers, *logging.getLogger().handlers]:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    if not verbose:
        warnings.filterwarnings("ignore", module=_LIBRARY_WARNINGS)
        # LightningCLI warns from its own frame about being given args; match the text as well
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if verbose:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def is_verbose() -> bool:
    """Whether this process's output is verbose (what a worker process should copy)."""
    return not _FILTER.enabled
