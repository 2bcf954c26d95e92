"""Find the Ray Train worker processes a process started, by PID ancestry — never by name across the machine.

The demo, the benchmarks and the tests signal or measure training workers; they must only ever touch processes
they started themselves, so the search starts from a root PID and looks only at its descendants.
"""
from __future__ import annotations

import psutil

WORKER_MARK = "RayTrainWorker"  # Ray's process title of a Ray Train worker actor


def train_workers(root_pid: int | None = None) -> list[psutil.Process]:
    """Ray Train worker processes among the descendants of `root_pid` (default: this process), by PID."""
    try:
        root = psutil.Process(root_pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if WORKER_MARK in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(out, key=lambda p: p.pid)
