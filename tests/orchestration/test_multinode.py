"""Multi-node Ray on one machine (issue 7 items 1–2): a head and 2 worker nodes, each a separate `ray start` process
tree on 127.0.0.1; training workers placed across nodes by the configured strategy; a whole worker node killed by
PID mid-run, a replacement node started, and the run ends with the same weights and data order as an uninterrupted
one; elastic sizing (min/max workers) continues at the smaller size with the exact data order.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.orchestration.multinode_helpers import RayCluster, listening_addresses
from tests.orchestration.test_train_integration import (
    REPO, STEPS, _assert_same, _final_tensors, _keys_by_step,
)

pytestmark = pytest.mark.integration

NODE_CPUS = 2  # two logical CPUs per worker node: PACK can put both training workers on one node, SPREAD cannot


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs: it hosts only the driver-side Train controller) + 2 worker nodes. Drivers run as
    `asymflow train --address` subprocesses with the cluster's environment (Ray reads RAY_AUTH_MODE when it is
    imported, so this test process cannot switch token auth on for itself)."""
    c = RayCluster(tmp_path_factory.mktemp("raycluster"))
    try:
        c.start_head()
        c.add_worker(NODE_CPUS)
        c.add_worker(NODE_CPUS)
        yield c
    finally:
        c.stop()


def _config(dataset: str, storage: Path, name: str, cluster: RayCluster, strategy: str, steps: int = STEPS,
            extra: tuple[str, ...] = ()) -> list[str]:
    """`asymflow train` arguments of a run on `cluster`."""
    sets = ["log.wandb_mode=offline", "sample.every=0", f"run.placement_strategy={strategy}", *extra]
    return ["train", str(REPO / "configs" / "tiny.yaml"), "--data", dataset, "--storage", str(storage), "--name", name,
            "--steps", str(steps), "--workers", "2", "--address", cluster.address,
            *(a for item in sets for a in ("--set", item))]


class NodeWatcher(threading.Thread):
    """Records on which worker node every training worker process runs (by process tree), and optionally kills the
    whole node hosting the last rank once `after_steps` steps are in keys.jsonl, then starts a replacement."""

    def __init__(self, cluster: RayCluster, run_dir: Path | None = None, after_steps: int = 0, replace: bool = True):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.after_steps, self.replace = cluster, run_dir, after_steps, replace
        self.placements: list[tuple[int, ...]] = []  # training workers per worker node, sampled
        self.killed: list[int] = []
        self.replacement = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            counts = tuple(len(n.train_worker_pids()) for n in self.cluster.workers)
            if sum(counts):
                self.placements.append(counts)
            if self.run_dir is not None and not self.killed:
                keys = self.run_dir / "keys.jsonl"
                if keys.exists() and len(keys.read_text().splitlines()) >= self.after_steps:
                    hosting = [n for n in self.cluster.workers if n.train_worker_pids()]
                    if hosting:
                        victim = hosting[-1]
                        self.killed = victim.kill(signal.SIGKILL)
                        self.cluster.workers.remove(victim)
                        if self.replace:
                            self.replacement = self.cluster.add_worker(NODE_CPUS)
            time.sleep(0.1)


def _launch(args: list[str], watcher: NodeWatcher, cluster: RayCluster, timeout: float = 600) -> str:
    import subprocess
    import sys

    watcher.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=cluster.env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        watcher.stop.set()
        watcher.join()
    assert proc.returncode == 0, (f"asymflow train exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def spread_run(dataset, cluster, tmp_path_factory):
    """The uninterrupted reference: 2 workers, SPREAD across the 2 worker nodes, STEPS steps."""
    storage = tmp_path_factory.mktemp("spread")
    watcher = NodeWatcher(cluster)
    _launch(_config(dataset, storage, "spread", cluster, "SPREAD"), watcher, cluster)
    return storage / "spread", watcher.placements


def test_all_ray_listeners_are_on_loopback(cluster):
    for node in [cluster.head, *cluster.workers]:
        assert listening_addresses(node.pid) <= {"127.0.0.1"}, node.name


def test_spread_puts_one_worker_on_each_node(spread_run):
    run_dir, placements = spread_run
    assert (1, 1) in placements, placements
    assert (2, 0) not in placements and (0, 2) not in placements
    assert sorted(_keys_by_step(run_dir)) == list(range(STEPS))


def test_pack_puts_both_workers_on_one_node(dataset, cluster, tmp_path):
    watcher = NodeWatcher(cluster)
    _launch(_config(dataset, tmp_path, "pack", cluster, "PACK", steps=1), watcher, cluster)
    assert set(watcher.placements) & {(2, 0), (0, 2)}, watcher.placements
    assert (1, 1) not in watcher.placements


@pytest.mark.slow
def test_node_loss_then_replacement_gives_identical_weights(dataset, cluster, spread_run, tmp_path):
    """SIGKILL a whole worker node (ray start process, raylet, its workers) after 3 steps, start a replacement node:
    Ray Train restarts the group (STRICT_SPREAD needs 2 nodes, so it really waits for the new node), which resumes
    from the last complete checkpoint; final weights, EMA and per-step samples equal the uninterrupted run's."""
    from orchestration.checkpoint import read_state
    from orchestration.ledger import Ledger

    reference, _ = spread_run
    watcher = NodeWatcher(cluster, tmp_path / "lost", after_steps=3)
    _launch(_config(dataset, tmp_path, "lost", cluster, "STRICT_SPREAD", extra=("run.max_failures=5",)), watcher,
            cluster)
    assert watcher.killed and watcher.replacement is not None
    assert watcher.replacement.train_worker_pids() or any(p == (1, 1) for p in watcher.placements[-5:])
    for ref, got in zip(_final_tensors(reference), _final_tensors(tmp_path / "lost")):
        _assert_same(ref, got)
    assert _keys_by_step(tmp_path / "lost") == _keys_by_step(reference)
    state = read_state(str(tmp_path / "lost" / "checkpoints" / f"step-{STEPS:08d}"))
    assert state["steps_lost"] >= 1 and state["goodput"]["interruptions"] >= 1
    events = [e for e in Ledger.for_run(str(tmp_path), "lost").read() if e["kind"] == "interruption"]
    assert events and events[0]["steps_lost"] >= 1


@pytest.mark.slow
def test_elastic_run_continues_on_fewer_nodes_with_exact_data_order(dataset, spread_run, tmp_path):
    """run.min_workers=1 on its own cluster of two 1-CPU worker nodes (Ray Train V2 sizes an elastic group by free
    resources, not by placement strategy, so one worker per node must come from the CPUs): a node lost without
    replacement → the group restarts with one worker, resumes through DeepSpeed's universal checkpoint, and the data
    order continues exactly (the same global batches in the same order as the 2-worker reference)."""
    import torch

    from orchestration.checkpoint import read_state

    reference, _ = spread_run
    small = RayCluster(tmp_path / "small")
    try:
        small.start_head()
        small.add_worker(1)
        small.add_worker(1)
        watcher = NodeWatcher(small, tmp_path / "elastic", after_steps=3, replace=False)
        cfg = _config(dataset, tmp_path, "elastic", small, "SPREAD", extra=("run.min_workers=1", "run.max_failures=5"))
        _launch(cfg, watcher, small)
    finally:
        small.stop()
    assert watcher.killed
    assert _keys_by_step(tmp_path / "elastic") == _keys_by_step(reference)
    state = read_state(str(tmp_path / "elastic" / "checkpoints" / f"step-{STEPS:08d}"))
    assert state["world_size"] == 1 and state["goodput"]["interruptions"] >= 1
    trainable, ema = _final_tensors(tmp_path / "elastic")
    assert all(torch.isfinite(t).all() for t in [*trainable.values(), *ema.values()])


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"asymflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _wait(predicate, timeout: float, what: str, every: float = 1.0, diagnose=lambda final: ""):
    """Poll `predicate` until truthy. `diagnose()` returns text explaining a failure so far (e.g. the job's state and
    logs); when it says the job has ended the wait fails at once with that text instead of running out the clock."""
    deadline, next_check = time.time() + timeout, time.time() + 15
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose(final=True)}")
        if time.time() > next_check:  # diagnose runs subprocesses: every 15 s is enough
            next_check = time.time() + 15
            ended = diagnose(final=False)
            if ended:
                raise AssertionError(f"gave up waiting for {what}: the job ended\n{ended}")
        time.sleep(every)


def _job_diagnosis(env: dict[str, str], storage: Path, name: str, address: str):
    """`diagnose` for `_wait`: while the job runs, nothing; once it has ended (or on the final call), its status and
    the tail of its driver log, so a CI failure says why the run made no progress."""
    import subprocess
    import sys

    def asymflow(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "orchestration.cli", *args, name, "--storage", str(storage),
                               "--address", address], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    def diagnose(final: bool) -> str:
        status = asymflow("status", "--json")
        try:
            state = json.loads(status).get("state") or ""
        except ValueError:
            state = ""
        if not final and state not in ("FAILED", "STOPPED", "SUCCEEDED"):
            return ""
        return f"asymflow status:\n{status}\nasymflow logs (tail):\n{asymflow('logs')[-8000:]}"
    return diagnose


@pytest.mark.slow
def test_head_loss_then_resubmit_resumes_from_storage(dataset, spread_run, tmp_path):
    """Kill the whole cluster (head with the job driver, and the worker nodes) by PID mid-run; start a new head and
    nodes; `asymflow submit` the same run → it resumes from the latest complete checkpoint in storage (found through
    the run ledger and the checkpoint listing, not the lost head), with the same wandb run id, and ends with the
    uninterrupted run's weights."""
    from orchestration import checkpoint as ckpt
    from orchestration.ledger import Ledger

    reference, _ = spread_run
    storage, run_dir = tmp_path / "runs", tmp_path / "runs" / "headloss"
    home = tmp_path / "home"
    home.mkdir()

    def start_cluster(name: str) -> RayCluster:
        c = RayCluster(tmp_path / name, dashboard=True)
        c.token_path = home / "auth_token"  # one token for both heads, as a user keeps ~/.ray/auth_token
        c.start_head()
        c.add_worker(1)
        c.add_worker(1)
        return c

    def cli_env(c: RayCluster) -> dict[str, str]:
        env = {k: v for k, v in c.env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        return {**env, "ASYMFLOW_HOME": str(home), "PYTHONUNBUFFERED": "1"}

    args = ["submit", str(REPO / "configs" / "tiny.yaml"), "--name", "headloss", "--storage", str(storage),
            "--data", dataset, "--steps", str(STEPS), "--workers", "2", "--no-working-dir",
            "--set", "sample.every=0", "--set", "run.placement_strategy=SPREAD"]
    first = start_cluster("c1")
    try:
        _cli(cli_env(first), *args, "--address", first.dashboard_url)
        _wait(lambda: ckpt.complete_steps(str(run_dir)), 600, "a first checkpoint",
              diagnose=_job_diagnosis(cli_env(first), storage, "headloss", first.dashboard_url))
        first.stop()  # SIGTERM then SIGKILL of every process tree: head (GCS, job driver), raylets, workers
    finally:
        first.stop()
    saved = ckpt.find_restore_point(str(run_dir))
    assert saved is not None and saved.step < STEPS
    wandb_id = saved.state["wandb_run_id"]

    second = start_cluster("c2")
    try:
        out = _cli(cli_env(second), *args, "--address", second.dashboard_url)
        assert f"resumes from checkpoint step {ckpt.complete_steps(str(run_dir))[-1]}" in out
        _wait(lambda: STEPS in ckpt.complete_steps(str(run_dir)), 600, "the resumed run to finish", every=2.0,
              diagnose=_job_diagnosis(cli_env(second), storage, "headloss", second.dashboard_url))
    finally:
        second.stop()
    final = ckpt.read_state(str(run_dir / "checkpoints" / f"step-{STEPS:08d}"))
    assert final["wandb_run_id"] == wandb_id
    for ref, got in zip(_final_tensors(reference), _final_tensors(run_dir)):
        _assert_same(ref, got)
    assert _keys_by_step(run_dir) == _keys_by_step(reference)
    ledger = Ledger.for_run(str(storage), "headloss")
    subs = ledger.submissions()
    assert [s["attempt"] for s in subs] == [1, 2] and subs[1]["resume_from_step"] >= saved.step
    assert any(e["kind"] == "interruption" for e in ledger.read())
    assert (home / "auth_token").read_text() not in (run_dir / "ledger.jsonl").read_text()
