"""atomic_folder / swap_folder: a folder is replaced whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fusion_common.atomic as atomic
from fusion_common import atomic_folder, swap_folder


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "a.txt").write_text("old a")
    (target / "sub" / "b.txt").write_text("old b")
    return target


def test_a_new_folder_appears_whole_with_its_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.") and not target.exists()
        (tmp / "x.txt").write_text("new")
    assert _tree(target) == {"x.txt": "new"}
    assert os.listdir(target.parent) == ["out"]


def test_an_existing_folder_is_replaced_whole(tmp_path: Path) -> None:
    target = _old(tmp_path)
    with atomic_folder(target, fsync=False) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert _tree(target) == {"c.txt": "new c"}  # nothing of the old folder is merged in
    assert os.listdir(tmp_path) == ["out"]  # no temp or old folder left beside it


def test_a_failing_block_keeps_the_old_folder(tmp_path: Path) -> None:
    target = _old(tmp_path)
    with pytest.raises(RuntimeError, match="half way"), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("half way")
    assert _tree(target) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_failing_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _old(tmp_path)
    real = os.replace
    calls: list[str] = []

    def flaky(src: Path, dst: Path) -> None:
        calls.append(Path(src).name)
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk says no")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk says no"), atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert calls[0] == "out" and calls[2].endswith(".old")  # moved aside, then back
    assert _tree(target) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert os.listdir(tmp_path) == ["out"]


def test_swap_folder_replaces_a_file_too(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")
    new = tmp_path / "new"
    new.mkdir()
    (new / "x.txt").write_text("x")
    swap_folder(new, target)
    assert _tree(target) == {"x.txt": "x"} and os.listdir(tmp_path) == ["out"]
