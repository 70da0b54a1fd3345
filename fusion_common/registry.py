"""A small name -> factory registry shared by encoders and fusion heads (as timm's)."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fusion_errors import RegistryError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Maps names to factories; a duplicate name is an error, not a warning."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        """``package``: a package whose public modules (names not starting with ``_``) register entries; they are
        imported on first lookup, so adding a component is adding one file."""
        self.kind = kind
        self.package = package
        self._discovered = package is None
        self._entries: dict[str, Callable[..., T]] = {}

    def _discover(self) -> None:
        if self._discovered or self.package is None:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory (function or class) under ``name`` (default: its own name)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or factory.__name__
            if key in self._entries and self._entries[key] is not factory:
                raise RegistryError(
                    f"{self.kind} name {key!r} is already registered by "
                    f"{self._entries[key].__module__}; choose another name."
                )
            self._entries[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory registered as ``name``, or raise a RegistryError listing close names."""
        self._discover()
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries)) or 'none'}."
            )
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def list(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style pattern (``"*lstm*"``)."""
        self._discover()
        names = sorted(self._entries)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries
