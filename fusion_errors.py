"""The project's own exception types.

Every user mistake raises one of these with a message that names the input and the fix,
so no user ever has to read a traceback from deep inside torch.
"""

from __future__ import annotations

__all__ = [
    "FusionZooError",
    "RegistryError",
    "ConfigError",
    "InputError",
    "DataError",
    "CheckpointError",
    "MissingDependencyError",
]


class FusionZooError(Exception):
    """Base class of every error fusion-zoo raises on purpose."""


class RegistryError(FusionZooError, KeyError):
    """An unknown or duplicate component name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConfigError(FusionZooError, ValueError):
    """A config key is unknown, missing or of the wrong type or value."""


class InputError(FusionZooError, ValueError):
    """A raw input (text, image, audio, tensor batch) cannot be used as given."""


class DataError(FusionZooError, ValueError):
    """A dataset, column, row or file cannot be used as given."""


class CheckpointError(FusionZooError, ValueError):
    """A saved model or checkpoint cannot be loaded as given."""


class MissingDependencyError(FusionZooError, ImportError):
    """An optional package (offline weights, export backend) is not installed."""
