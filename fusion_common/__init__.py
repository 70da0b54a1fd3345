"""Helpers every layer uses: atomic file and folder writes and the name -> factory registry.

The bottom of the house, beside ``fusion_errors``: it imports nothing from the project but ``fusion_errors``, so
``encoders``, ``fusion_heads``, ``zoo``, ``recipes`` and ``benchmarks`` can all use it without reaching into
another package's private files.
"""

from .atomic import atomic_folder, atomic_write, swap_folder
from .registry import Registry

__all__ = ["Registry", "atomic_folder", "atomic_write", "swap_folder"]
