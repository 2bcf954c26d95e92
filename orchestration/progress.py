"""`RUN_DIR/progress.json`: the latest logged step of a run (step, total, rate, ETA), on local and object storage.

Rank 0 rewrites it at every logged step (one small object: object stores cannot append, so `metrics.jsonl` is
local-only); `asymflow status` reads it on every storage kind instead of parsing log lines.
"""
from __future__ import annotations

import json
from typing import Any

import fsspec

PROGRESS_FILE = "progress.json"
FIELDS = ("step", "total", "samples_per_s", "eta_s", "time")


def progress_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{PROGRESS_FILE}"


def write_progress(run_dir: str, record: dict[str, Any]) -> None:
    """Replace the file with `record` (FIELDS). Local: a temp file renamed over it, so a reader never sees half."""
    from data_prep.chunk import put_atomic

    data = json.dumps({k: record.get(k) for k in FIELDS}).encode()
    fs, path = fsspec.core.url_to_fs(progress_path(run_dir))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        put_atomic(progress_path(run_dir), data)
    else:  # one PUT is atomic on an object store
        with fs.open(path, "wb") as f:
            f.write(data)


def read_progress_file(run_dir: str) -> dict[str, Any] | None:
    """{step, total, samples_per_s, eta_s, time}, or None when the run has logged nothing yet (or it is unreadable)."""
    try:
        fs, path = fsspec.core.url_to_fs(progress_path(run_dir))
        with fs.open(path, "rb") as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return {k: record.get(k) for k in FIELDS} if isinstance(record, dict) else None
