"""`progress.json`, what `asymflow status` reads, on local and object (fsspec memory://) storage."""
from __future__ import annotations

import json
import os

import pytest

from orchestration.jobs import read_progress
from orchestration.progress import read_progress_file, write_progress


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_progress_round_trip_and_status_prefers_it(kind, tmp_path):
    run_dir = str(tmp_path / "run") if kind == "local" else f"memory://progress-{os.getpid()}/run"
    assert read_progress(run_dir) is None
    write_progress(run_dir, {"step": 3, "total": 10, "samples_per_s": 2.5, "eta_s": 7.0, "time": 1.0, "loss": 0.1})
    write_progress(run_dir, {"step": 4, "total": 10, "samples_per_s": 2.0, "eta_s": 6.0, "time": 2.0})
    expected = {"step": 4, "total": 10, "samples_per_s": 2.0, "eta_s": 6.0, "time": 2.0}
    assert read_progress_file(run_dir) == expected
    if kind == "local":  # an older metrics.jsonl line does not win over progress.json
        (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "total_steps": 10}) + "\n")
        assert not any(p.name.startswith("progress.json.tmp") for p in (tmp_path / "run").iterdir())
    assert read_progress(run_dir) == expected
