"""DESIGN.md §1: one direction of imports — asymflow pulls in no ray/deepspeed/webdataset, data_prep no deepspeed."""
import json
import subprocess
import sys

import pytest

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
