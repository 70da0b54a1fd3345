"""Row checks that scale: a file cell is opened and verified once per version of the file, not on every run.

:func:`check_cell` gives a cell's problem (``recipes._columns.cell_problem``) and its stamp (the path, size and
modification time that go into the feature cache key). For a cell that names an existing file, the check's verdict
is looked up in a :class:`CheckedFiles` store by the file's fingerprint (absolute path, size, ``mtime_ns``,
modality): a warm run stats each file and opens none. Only files that passed are remembered; a bad file is checked
again on every run, so its message is always current.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from fusion_common.atomic import atomic_write

from ._columns import cell_problem

__all__ = ["CheckedFiles", "check_cell", "MAX_CHECKED"]

MAX_CHECKED = 2_000_000  # fingerprints kept (~70 MB of JSON at most); the least recently used are dropped
STORE_NAME = "row-checks.json"
_VERSION = 1


class CheckedFiles:
    """Fingerprints of files that passed their check, in ``<folder>/row-checks.json`` (written atomically).

    A missing, unreadable or foreign store is ignored and rebuilt.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.path = Path(folder) / STORE_NAME if folder is not None else None
        self._good: dict[str, None] = {}  # insertion order = recency (dict: ordered, O(1) membership)
        self._dirty = False
        if self.path is not None:
            try:
                doc = json.loads(self.path.read_text())
                if isinstance(doc, dict) and doc.get("version") == _VERSION and isinstance(doc.get("good"), list):
                    self._good = dict.fromkeys(str(k) for k in doc["good"])
            except (OSError, ValueError):
                self._good = {}

    def __len__(self) -> int:
        return len(self._good)

    def known(self, fingerprint: str) -> bool:
        """Whether the file with this fingerprint passed before (and mark it recently used)."""
        if fingerprint in self._good:
            if self._dirty:  # keep the recency order only when the store is rewritten anyway
                self._good[fingerprint] = self._good.pop(fingerprint)
            return True
        return False

    def add(self, fingerprint: str) -> None:
        self._good[fingerprint] = None
        self._dirty = True

    def save(self) -> None:
        """Write the store if something was added (best effort: a read-only cache folder only costs speed)."""
        if self.path is None or not self._dirty:
            return
        keep = list(self._good)[-MAX_CHECKED:]
        try:
            with atomic_write(self.path, fsync=False) as tmp:
                tmp.write_text(json.dumps({"version": _VERSION, "good": keep}))
        except OSError:
            return
        self._dirty = False


def _file_of(modality: str, v: Any) -> str | None:
    """The path an image/audio cell points to (None for text, in-line bytes, arrays)."""
    if modality == "text":
        return None
    path = v if isinstance(v, str) else v.get("path") if isinstance(v, dict) and not v.get("bytes") else None
    return str(path) if path else None


def check_cell(modality: str, v: Any, checked: CheckedFiles) -> tuple[str | None, str]:
    """(problem or None, stamp) of one non-missing cell; a file that passed before at this size and mtime is not
    opened again. The stamp is ``path:size:mtime_ns;`` for an existing file, else ''."""
    path = _file_of(modality, v)
    st = None
    if path is not None:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # absent, a name too long or with NUL bytes: cell_problem names it
            st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return cell_problem(modality, v), ""
    assert path is not None
    stamp = f"{path}:{st.st_size}:{st.st_mtime_ns};"
    full = path if os.path.isabs(path) else os.path.abspath(path)  # data paths arrive absolute: skip normpath
    key = f"{modality}\0{full}\0{st.st_size}\0{st.st_mtime_ns}"
    fingerprint = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    if checked.known(fingerprint):
        return None, stamp
    problem = cell_problem(modality, v)
    if problem is None:
        checked.add(fingerprint)
    return problem, stamp
