"""Write-to-temp-then-rename, once for every package: ``atomic_write`` for a file, ``atomic_folder`` for a folder.

They live in the neutral bottom package so every layer (the encoders' weight caches, ``zoo``, ``recipes``,
``benchmarks``) writes the same way: readers, and a writer that crashes, see the old file or folder or the whole new
one, never half of one. Checkpoint folders add their own guards in ``zoo._format.atomic_folder``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_folder", "swap_folder", "temp_name", "HOST_TAG"]

#: this machine in temp names (8 hex digits of its host name): a folder shared by several machines (NFS) holds
#: temp files of writers whose process ids mean nothing here, and a cleanup must tell them apart
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temp_name(name: str, suffix: str = ".tmp") -> str:
    """``.<name>.<host>-<pid>-<random><suffix>``: hidden, unique, and saying which machine and process wrote it."""
    return f".{name}.{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


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
    tmp = target.with_name(temp_name(target.name))
    try:
        yield tmp
        if fsync:
            _fsync(tmp, directory=False)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync(target.parent, directory=True)


@contextmanager
def atomic_folder(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a new empty folder next to ``path``; when the block succeeds it takes ``path``'s place whole.

    The temp folder sits beside the target (renames, never a cross-device copy) and is named
    ``.<name>.<host>-<pid>-<tag>.tmp``; when the block raises it is deleted and ``path`` is left as it was. On success
    its files are flushed to disk (``fsync``; pass False for data that is cheap to rebuild) and
    :func:`swap_folder` puts it in place: an existing ``path`` is moved aside, the new folder renamed in, then the
    old one deleted; if the rename fails the old one is put back.

    Example::

        with atomic_folder(out_dir / "dataset") as tmp:
            (tmp / "train.csv").write_text(table)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(temp_name(target.name))
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for file in (p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()):
                _fsync(file, directory=False)
        swap_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a swap
    if fsync:
        _fsync(target.parent, directory=True)


def swap_folder(new: str | Path, target: str | Path) -> None:
    """Put the finished folder ``new`` at ``target`` by renames in the same parent folder.

    An existing ``target`` (folder or file) is first renamed to ``.<name>.<host>-<pid>-<tag>.old``, then ``new`` is
    renamed to ``target`` and the old one deleted; when that second rename fails the old one is renamed back, so
    ``target`` is never missing or half-written for longer than between two renames.
    """
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    old = target.with_name(temp_name(target.name, ".old"))
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


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
