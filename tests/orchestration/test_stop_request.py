"""The persistent stop request (orchestration.stop_request) on local and in-memory fsspec storage, and the driver's
SIGTERM turned into it (real signals to a real subprocess); the workers' use of it is tested in test_jobs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.preemption import CONTINUE, PREEMPT, STOP, agree_to_stop
from orchestration.stop_request import StopPoller, clear_stop_request, read_stop_request, request_stop

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_request_read_poll_clear(kind, tmp_path):
    run_dir = str(tmp_path / "run") if kind == "local" else f"memory://stop-test-{os.getpid()}/run"
    poller = StopPoller(run_dir, every_s=0.0)
    assert read_stop_request(run_dir) is None and not poller.requested()
    request = request_stop(run_dir, source="test", submission_id="asymflow-x-1")
    assert read_stop_request(run_dir) == request and request["now"] is False and request["id"]
    assert poller.requested()
    assert clear_stop_request(run_dir) and not clear_stop_request(run_dir)
    assert read_stop_request(run_dir) is None and not poller.requested()


def test_object_store_polling_is_throttled():
    run_dir = f"memory://stop-throttle-{os.getpid()}/run"
    poller = StopPoller(run_dir, every_s=60.0)
    assert poller.every_s == 60.0 and not poller.requested()
    request_stop(run_dir, source="test")
    assert not poller.requested()  # within the poll interval: no round trip
    poller._next = 0.0
    assert poller.requested()


def test_stop_outranks_preemption_without_a_process_group():
    assert agree_to_stop(CONTINUE) == CONTINUE and agree_to_stop(PREEMPT) == PREEMPT and agree_to_stop(STOP) == STOP


_DRIVER = r"""
import sys, time
from orchestration.stop_request import DriverStopHandler
handler = DriverStopHandler(sys.argv[1], log=lambda line: print(line, flush=True))
handler.install()
print("ready", flush=True)
time.sleep(60)
"""


def _driver(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_driver_sigterm_becomes_a_stop_request_and_a_second_one_exits(tmp_path):
    proc = _driver(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert "SIGTERM: the workers checkpoint" in proc.stdout.readline()
        assert proc.poll() is None  # still waiting for the workers
        assert read_stop_request(str(tmp_path))["source"] == "SIGTERM to the driver"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()


def test_driver_exits_at_once_on_a_stop_now_request(tmp_path):
    proc = _driver(tmp_path)
    try:
        request_stop(str(tmp_path), source="asymflow stop", now=True)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM and time.time() - t0 < 30
        assert "stop --now" in proc.stdout.read()
    finally:
        proc.kill()
