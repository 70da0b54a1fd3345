"""Named data sources: ``--data.dataset NAME`` for datasets the project can build offline.

Formats (how files, folders and hub names are read) are :mod:`recipes.formats`; a named source is a dataset.

A named source is one registered function that returns the dataset's splits (and the folder its relative paths
resolve against). ``fit``, ``test``, ``sweep``, ``predict --table`` and ``zoo verify`` read every source through
:func:`recipes.formats.load_source`, so a registered name works everywhere a Hub name or a folder does. Sources
register themselves where they live (``recipes/tridigits``, ``recipes/easyvqa.py``, ``recipes/heldout_speakers.py``);
the modules in :data:`BUILTIN` are imported the first time a name is looked up, so a lookup never misses a built-in
source and importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from fusion_errors import RegistryError

__all__ = ["BUILTIN", "NamedSource", "get_source", "list_sources", "register_source"]

#: modules that register the project's own named sources
BUILTIN = ("recipes.tridigits.dataset", "recipes.easyvqa", "recipes.heldout_speakers")

Loader = Callable[[], tuple[datasets.DatasetDict, Path | None]]


@dataclass(frozen=True)
class NamedSource:
    """A registered dataset: its loader, a one-line description and where its data comes from (for cards)."""

    name: str
    load: Loader
    description: str
    origin: str


_SOURCES: dict[str, NamedSource] = {}
_loaded = False


def register_source(name: str, description: str, origin: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``loader() -> (DatasetDict, base folder | None)`` as ``--data.dataset name``."""
    def wrap(loader: Loader) -> Loader:
        if name in _SOURCES and _SOURCES[name].load is not loader:
            raise RegistryError(f"data source {name!r} is registered twice.")
        _SOURCES[name] = NamedSource(name, loader, description, origin)
        return loader
    return wrap


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def get_source(name: str) -> NamedSource | None:
    """The source registered as ``name``, or None (then the name is a folder, a file or a Hub dataset)."""
    _load_builtin()
    return _SOURCES.get(name)


def list_sources() -> list[str]:
    """Names of the registered sources."""
    _load_builtin()
    return sorted(_SOURCES)
