"""The runs this user submitted, `$ASYMFLOW_HOME/runs.json` (default ~/.asymflow): run name → storage and job address.

`asymflow submit --storage X` records the run here, so `status`, `logs`, `stop` and `list` find it without the user
repeating `--storage`. The registry is a convenience index only: the run's own ledger (in its storage) stays the
record; a missing or unreadable registry means "not remembered", never an error.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REGISTRY = "runs.json"
DEFAULT_STORAGE = "runs"


def home_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("ASYMFLOW_HOME") or Path.home() / ".asymflow")


def _read(home: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((home / REGISTRY).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(home: Path, run: str, storage: str, address: str | None) -> None:
    """Record (or refresh) a submitted run; written to a temp file and renamed, so readers never see half of it."""
    runs = _read(home)
    runs[run] = {"storage": storage, "address": address, "time": round(time.time(), 3)}
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{REGISTRY}.{os.getpid()}"
    tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
    os.replace(tmp, home / REGISTRY)


def storage_of(home: Path, run: str, given: str | None) -> str:
    """The storage to look for `run` in: the one given, else the remembered one, else `runs`."""
    if given:
        return given
    return _read(home).get(run, {}).get("storage") or DEFAULT_STORAGE


def storages(home: Path, given: str | None) -> list[str]:
    """Where `list` looks: the storage given, else every remembered storage plus `runs` (if it exists)."""
    if given:
        return [given]
    found = sorted({entry["storage"] for entry in _read(home).values() if entry.get("storage")})
    return found + ([DEFAULT_STORAGE] if os.path.isdir(DEFAULT_STORAGE) and os.path.abspath(DEFAULT_STORAGE)
                    not in {os.path.abspath(s) for s in found} else [])
