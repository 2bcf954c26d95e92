"""`submit --storage X` is remembered under $ASYMFLOW_HOME, so status / logs / stop / list find the run without
repeating --storage (real ledger files, the real CLI in process; the recorded head is unreachable on purpose)."""
from __future__ import annotations

import json

from orchestration import run_registry
from orchestration.cli import main
from orchestration.ledger import Ledger

DEAD = "http://127.0.0.1:9"


def test_registry_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    assert run_registry.storage_of(home, "r", None) == "runs" and run_registry.storages(home, None) == []
    run_registry.remember(home, "r", "/data/runs-a", DEAD)
    run_registry.remember(home, "q", "s3://bucket/runs", None)
    assert run_registry.storage_of(home, "r", None) == "/data/runs-a"
    assert run_registry.storage_of(home, "r", "/given") == "/given"
    (tmp_path / "runs").mkdir()
    assert run_registry.storages(home, None) == ["/data/runs-a", "s3://bucket/runs", "runs"]
    (home / "runs.json").write_text("{torn")
    assert run_registry.storage_of(home, "r", None) == "runs"  # unreadable: not remembered, not an error


def test_status_and_list_find_a_submitted_run_without_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASYMFLOW_HOME", str(tmp_path / "home"))
    storage = str(tmp_path / "elsewhere")
    Ledger.for_run(storage, "r").append("submit", submission_id="asymflow-r-1", attempt=1, address=DEAD, total_steps=8)
    run_registry.remember(run_registry.home_dir(), "r", storage, DEAD)

    assert main(["status", "r", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run_dir"] == f"{storage}/r" and info["submission_id"] == "asymflow-r-1" and "cluster_error" in info
    assert main(["list", "--json"]) == 0
    assert [row["run"] for row in json.loads(capsys.readouterr().out)] == ["r"]
    assert main(["logs", "r"]) == 2  # found the run; only its head is unreachable
    assert "Failed to connect to Ray" in capsys.readouterr().err
