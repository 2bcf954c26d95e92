"""A persistent stop request: the `STOP` marker in the run directory, on local or object storage (fsspec).

`asymflow stop` (or the driver, on SIGTERM from `ray job stop`) writes it; every rank checks it at the step boundary
and the ranks agree through the preemption all-reduce, commit a checkpoint and end the training function normally
(so Ray Train does not restart them); rank 0 then records a `stopped` ledger event and removes the marker. Being a
file next to the checkpoints, the request survives a missed log line, a loaded machine and a restarted worker group.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from typing import Any

import fsspec

STOP_MARKER = "STOP"


def marker_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{STOP_MARKER}"


def request_stop(run_dir: str, source: str, now: bool = False, **fields: Any) -> dict[str, Any]:
    """Write the marker (overwriting an older one) and return it: {id, time, source, now, ...}. `now`: the driver
    exits at once instead of waiting for a checkpoint."""
    request = {"id": uuid.uuid4().hex[:12], "time": round(time.time(), 3), "source": source, "now": now, **fields}
    fs, path = fsspec.core.url_to_fs(marker_path(run_dir))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(json.dumps(request).encode())
    return request


def read_stop_request(run_dir: str) -> dict[str, Any] | None:
    """The pending request, or None. A marker being written right now (empty or torn) still counts as a request."""
    fs, path = fsspec.core.url_to_fs(marker_path(run_dir))
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        request = json.loads(data)
    except ValueError:
        return {"id": None, "source": "unknown", "now": False}
    return request if isinstance(request, dict) else {"id": None, "source": "unknown", "now": False}


def clear_stop_request(run_dir: str) -> bool:
    """Remove the marker; True when there was one."""
    fs, path = fsspec.core.url_to_fs(marker_path(run_dir))
    try:
        fs.rm(path)
    except FileNotFoundError:
        return False
    return True


class StopPoller:
    """Per-rank check of the marker at step boundaries. A local stat costs microseconds, so local storage is checked
    every step; an object store costs a round trip, so there at most once per `every_s` seconds (the all-reduce that
    follows makes all ranks agree whatever each one saw)."""

    def __init__(self, run_dir: str, every_s: float = 5.0):
        self.run_dir = run_dir
        fs, self.path = fsspec.core.url_to_fs(marker_path(run_dir))
        self.fs = fs
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self.every_s = 0.0 if ("file" in protocols or "local" in protocols) else every_s
        self._next = 0.0

    def requested(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        try:
            if self.every_s:
                self.fs.invalidate_cache(self.path)  # s3fs answers `exists` from a cached listing otherwise
            return bool(self.fs.exists(self.path))
        except OSError:  # a storage hiccup must not end training; the next poll sees the marker
            return False


class DriverStopHandler:
    """The driver's SIGTERM (Ray's `ray job stop`, `asymflow stop`, a scheduler) becomes a stop request: a thread
    writes the marker (no storage I/O inside the signal handler) and the driver keeps waiting for the workers'
    checkpoint. A request marked `now`, or a second SIGTERM, exits at once. Main thread only (Python's rule for
    signal handlers); elsewhere `install` does nothing."""

    def __init__(self, run_dir: str, log=print):
        self.run_dir = run_dir
        self.log = log
        self.received = threading.Event()
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received.is_set():
            os._exit(128 + signum)  # second SIGTERM: the user means it
        self.received.set()
        threading.Thread(target=self._request, name="asymflow-stop", daemon=True).start()

    def _request(self) -> None:
        pending = read_stop_request(self.run_dir)
        if pending is not None and pending.get("now"):
            self.log("[asymflow] stop --now: exiting without a checkpoint")
            os._exit(128 + signal.SIGTERM)
        if pending is None:
            request_stop(self.run_dir, source="SIGTERM to the driver")
        self.log("[asymflow] SIGTERM: the workers checkpoint at the next step and stop (a second SIGTERM exits now)")
