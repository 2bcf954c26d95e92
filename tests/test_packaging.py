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
    lists = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.List)}
    reqs: list[str] = list(lists.get("INSTALL_REQUIRES", []))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            for value in node.value.values:  # a literal list or the name of a module-level list
                reqs += lists[value.id] if isinstance(value, ast.Name) else ast.literal_eval(value)
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
