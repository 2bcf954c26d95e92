"""`prep shards --ray-address`: the same chunk tasks as the local runner, run as Ray tasks, results in chunk order (the only module that imports ray).

Ray's task scheduler does the distribution, retries (a lost node's chunk is rebuilt: its temp tar name is
fixed per task and its bytes deterministic) and placement; the driver keeps committing in chunk order, so
the output is byte-identical to a local build. Every node must reach OUTPUT (an fsspec URL such as s3://…,
or a shared filesystem), because workers write their temp tars under OUTPUT/_build/tmp.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

from data_prep.chunk import ChunkResult, ChunkTask, Progress, build_chunk

LOCAL = "local"  # --ray-address local: start a private single-node Ray on loopback


def run_ray(tasks: list[ChunkTask], address: str, progress: Progress) -> Iterator[ChunkResult]:
    """Submit chunks as Ray tasks (1 CPU each, a window of 2× cluster CPUs in flight); yield results in order."""
    # Read by ray at import time: bind every Ray socket to loopback for a local cluster (DESIGN.md §3).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if address == LOCAL:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        remote_build = ray.remote(num_cpus=1, max_retries=3)(build_chunk)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        todo = iter(tasks)
        while True:
            while len(pending) < window and (task := next(todo, None)) is not None:
                pending.append((task, remote_build.remote(task)))
            if not pending:
                return
            task, ref = pending.popleft()
            result = ray.get(ref)
            progress(len(task.items))
            yield result
    finally:
        if started_here:
            ray.shutdown()
