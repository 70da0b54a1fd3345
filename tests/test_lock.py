"""constraints.txt is the installed dependency set (.ci/lock.py): a new, drifted or dropped package fails here with
the command that fixes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ci_lock", ROOT / ".ci" / "lock.py")
assert spec and spec.loader
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def test_the_installed_set_is_the_lock() -> None:
    diff = lock.differences(lock.LOCK.read_text(), lock.closure())
    assert not diff, (f"the venv differs from constraints.txt ({'; '.join(diff[:5])}): run {lock.INSTALL} to match "
                      f"it, or {lock.RELOCK} to re-lock on purpose")


def test_the_lock_holds_the_dependencies_and_their_dependencies() -> None:
    pins, tag = lock.read(lock.LOCK.read_text())
    assert tag and "fusion-zoo" not in pins  # the project itself is installed editable, never pinned
    for name in ("torch", "pytorch-lightning", "jsonargparse", "pytest", "tensorboard", "fastapi"):  # direct, extras
        assert name in pins, name
    for name in ("lightning-utilities", "starlette", "tokenizers"):  # only needed by dependencies
        assert name in pins, name
    assert all(v and "==" not in v for v in pins.values())


def test_differences_name_new_drifted_and_dropped_packages() -> None:
    text = lock.render({"torch": ("torch", "2.11.0"), "old-pkg": ("Old_Pkg", "1.0"), "numpy": ("numpy", "2.4.6")})
    pins = {"torch": ("torch", "2.12.0"), "numpy": ("numpy", "2.4.6"), "new-pkg": ("new-pkg", "0.3")}
    assert lock.differences(text, pins) == ["new-pkg 0.3 is not locked", "torch is 2.12.0, locked 2.11.0",
                                            "old-pkg is locked but no longer required"]
    other_platform = text.replace(lock.platform_tag(), "darwin-arm64-py3.12")  # markers drop packages elsewhere
    assert lock.differences(other_platform, {k: v for k, v in pins.items() if k != "new-pkg"}) == [
        "torch is 2.12.0, locked 2.11.0"]
    assert lock.differences(text, {"torch": ("torch", "2.11.0"), "old-pkg": ("Old_Pkg", "1.0"),
                                   "numpy": ("numpy", "2.4.6")}) == []


def test_render_and_read_round_trip_with_the_regenerate_command_in_the_header() -> None:
    text = lock.render({"scipy": ("scipy", "1.17.1"), "pyyaml": ("PyYAML", "6.0.4")})
    assert lock.RELOCK in text and lock.INSTALL in text
    assert text.splitlines()[-2:] == ["PyYAML==6.0.4", "scipy==1.17.1"]
    assert lock.read(text) == ({"pyyaml": "6.0.4", "scipy": "1.17.1"}, lock.platform_tag())


def test_a_dependency_added_to_pyproject_but_not_installed_names_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    requires = lock._pyproject_requires()
    assert requires and "torch==2.11.0" in requires  # read from pyproject.toml as it is now
    monkeypatch.setattr(lock, "_pyproject_requires", lambda: [*requires, "fusion-zoo-no-such-package>=1"])
    with pytest.raises(SystemExit, match="fusion-zoo-no-such-package is required but not installed; run .*-c "
                                         "constraints.txt"):
        lock.closure()
