"""Installability: setup.py states compatible ranges (no exact pins), constraints.txt holds the exact tested set,
every requirement's locked version satisfies its range, and this environment is the locked one."""
from __future__ import annotations

import ast
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _setup_requirements() -> list[Requirement]:
    """install_requires and every extra, read from setup.py's source (nothing is executed)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    reqs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets):
            reqs += ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            for values in ast.literal_eval(node.value).values():
                reqs += values
    assert reqs, "setup.py lists no requirements"
    return [Requirement(r) for r in reqs]


def _lock() -> dict[str, Version]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def test_setup_states_ranges_and_the_lock_satisfies_them():
    lock = _lock()
    for req in _setup_requirements():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"setup.py pins {req} exactly"
        assert req.specifier, f"setup.py gives {req.name} no version range"
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is missing from constraints.txt"
        assert req.specifier.contains(lock[name], prereleases=True), f"locked {name}=={lock[name]} violates {req}"


def test_this_environment_is_the_locked_one():
    lock = _lock()
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            continue  # an extra this environment does not carry
        assert Version(installed.public) == lock[name], f"{name} {installed} installed, constraints.txt says {lock[name]}"
