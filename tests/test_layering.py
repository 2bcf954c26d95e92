"""DESIGN.md §1: one direction of imports — asymflow pulls in no ray/deepspeed/webdataset, data_prep no deepspeed."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every module of the package is imported (not just __init__), so a stray import anywhere is caught.
PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module({pkg!r})
skip = set({skip!r})
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if info.name not in skip:
        importlib.import_module(info.name)
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


@pytest.mark.parametrize(
    "package, forbidden, skip",
    [
        ("asymflow", {"ray", "deepspeed", "webdataset", "orchestration", "data_prep"}, []),
        # ray is allowed only inside the --ray-address runner module, which is skipped here
        ("data_prep", {"deepspeed", "orchestration", "ray"}, ["data_prep.ray_runner"]),
    ],
)
def test_package_does_not_import(package, forbidden, skip):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(pkg=package, skip=skip)], capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not (loaded & forbidden), f"{package} imported {sorted(loaded & forbidden)}"


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Project modules `path` imports, at any depth (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out - {module}


def test_no_two_modules_import_each_other():
    """Each pair of modules has a lower and a higher one: no A → B → A, function-level imports included."""
    files = {}
    for package in ("asymflow", "data_prep", "orchestration"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            files[name] = path
    graph = {name: _imports(path, name, set(files)) for name, path in files.items()}
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert not circles, f"modules importing each other: {circles}"
