"""``atomic_write``: the one write-to-temp-then-rename helper every package uses for files.

It lives in the neutral bottom package so every layer (the encoders' weight caches, ``zoo``, ``recipes``,
``benchmarks``) writes files the same way. Checkpoint folders go through ``zoo._format.atomic_folder``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path`` in one rename.

    The temp file sits in the target's own folder (a rename, never a cross-device copy), is flushed to disk
    (``fsync``) before the rename and removed when the block raises, so readers and a crashed writer see the old
    file or the whole new one, never a half-written one. Its name starts with ``.`` and ends in ``.tmp``: give
    writers that infer a format from the suffix (``savefig``) the format explicitly.

    Example::

        with atomic_write(run_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync(tmp, directory=False)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync(target.parent, directory=True)


def _fsync(path: Path, *, directory: bool) -> None:
    """Flush a file's bytes (or a folder's entries, where the OS allows opening folders) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if not directory:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)
