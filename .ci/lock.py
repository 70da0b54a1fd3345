"""Write or check ``constraints.txt``: the exact versions of everything ``pip install -e ".[dev]"`` resolves.

The lock is the dependency closure of ``fusion-zoo[dev]`` read from the installed packages' metadata (not
``pip freeze``, so a stray package in one's venv never enters it). README's install command passes it with ``-c``,
so a fresh install next month gets the set CI tested.

    .venv/bin/python .ci/lock.py           # re-lock: write constraints.txt from the current venv
    .venv/bin/python .ci/lock.py --check   # exit 1 with a one-line fix when the venv and the lock differ
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fusion_common.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PROJECT = "fusion-zoo"
EXTRAS = frozenset({"dev"})
INSTALL = '.venv/bin/pip install -e ".[dev]" -c constraints.txt'
RELOCK = ".venv/bin/python .ci/lock.py"


def platform_tag() -> str:
    """Where the lock was resolved: markers (``platform_system == "Linux"``) make the closure platform-specific."""
    return f"{sys.platform}-{platform.machine()}-py{sys.version_info.major}.{sys.version_info.minor}"


def closure(project: str = PROJECT, extras: frozenset[str] = EXTRAS) -> dict[str, tuple[str, str]]:
    """Every distribution ``project[extras]`` needs here, transitively: canonical name -> (name, installed version).

    Raises:
        SystemExit: a required distribution is not installed (the venv is incomplete: reinstall).
    """
    wanted: dict[str, frozenset[str]] = {}
    found: dict[str, tuple[str, str]] = {}
    todo = [(project, extras)]
    while todo:
        name, want = todo.pop()
        key = canonicalize_name(name)
        if key in wanted and want <= wanted[key]:
            continue
        wanted[key] = wanted.get(key, frozenset()) | want
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"lock: {name} is required but not installed; run {INSTALL}") from None
        found[key] = (dist.metadata["Name"], dist.version)
        requires = _pyproject_requires() if key == canonicalize_name(project) else None
        for line in dist.requires or [] if requires is None else requires:
            req = Requirement(line)
            envs = [{**default_environment(), "extra": extra} for extra in ("", *sorted(wanted[key]))]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    found.pop(canonicalize_name(project))
    return found


def _pyproject_requires() -> list[str] | None:
    """The project's requirements as pyproject.toml states them now (the installed metadata may predate an edit),
    in the metadata's form (extras as ``; extra == "name"`` markers); None without tomllib (Python 3.10)."""
    try:
        import tomllib
    except ImportError:
        return None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = list(project.get("dependencies", []))
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for line in reqs:
            req, _, marker = line.partition(";")
            out.append(f"{req.strip()}; " + (f"({marker.strip()}) and " if marker.strip() else "") +
                       f"extra == {extra!r}")
    return out


def render(pins: dict[str, tuple[str, str]]) -> str:
    """The lock file's text: a header saying how to use and regenerate it, then ``name==version`` lines."""
    header = [
        f"# The resolved dependency set of {PROJECT}[dev], used by README's install command:",
        f"#   {INSTALL}",
        f"# Regenerate after changing pyproject.toml's dependencies (or to take newer releases on purpose): {RELOCK}",
        f"# resolved on: {platform_tag()}",
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.values(), key=lambda p: canonicalize_name(p[0]))]
    return "\n".join(header + body) + "\n"


def read(text: str) -> tuple[dict[str, str], str | None]:
    """Parse a lock file: canonical name -> version, and the platform tag it was resolved on."""
    pins: dict[str, str] = {}
    tag = None
    for line in text.splitlines():
        if line.startswith("# resolved on:"):
            tag = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.strip())] = version.strip()
    return pins, tag


def differences(lock_text: str, pins: dict[str, tuple[str, str]]) -> list[str]:
    """What differs between the lock and the installed closure, one short phrase each (empty: the lock is current).

    Locked packages missing from the closure count only where the lock was resolved, since markers drop some
    (e.g. the CUDA wheels) on other platforms.
    """
    locked, tag = read(lock_text)
    out = []
    for key, (name, version) in sorted(pins.items()):
        if key not in locked:
            out.append(f"{name} {version} is not locked")
        elif locked[key] != version:
            out.append(f"{name} is {version}, locked {locked[key]}")
    if tag == platform_tag():
        out += [f"{key} is locked but no longer required" for key in sorted(set(locked) - set(pins))]
    return out


def main(argv: list[str]) -> int:
    """Write the lock, or with ``--check`` compare it with the venv; exit 1 with the fix on a difference."""
    pins = closure()
    if "--check" not in argv:
        with atomic_write(LOCK) as tmp:
            tmp.write_text(render(pins))
        print(f"lock: wrote {len(pins)} pins to {LOCK.name}")
        return 0
    if not LOCK.is_file():
        print(f"lock: {LOCK.name} is missing; run {RELOCK}", file=sys.stderr)
        return 1
    diff = differences(LOCK.read_text(), pins)
    if diff:
        print(f"lock: the venv differs from {LOCK.name} ({'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); "
              f"run {INSTALL} to match it, or {RELOCK} to re-lock on purpose", file=sys.stderr)
        return 1
    print(f"lock: {LOCK.name} is current ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
