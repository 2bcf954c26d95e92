"""Storage as several nodes see it (issue 12 items 5–6), on a head and two Ray worker nodes on 127.0.0.1.

Each worker node has its own temp directory (its node-local restore cache) and reaches SeaweedFS through its own
byte-counting relay, so what each node downloads is measured outside the code under test. The second node runs in
its own mount namespace with a private tmpfs over one directory: node-local storage where the driver and the first
node see the real directory.

- A resume from object storage downloads about one checkpoint per node although each node runs two ranks (before:
  one whole copy per rank), through DeepSpeed's universal conversion, which each node runs on its own copy.
- A run whose run directory and dataset sit on that node-local path stops before step 0 with one error naming the
  node and the paths, and Ray Train does not retry it; the shared-storage runs above pass the same probe.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestration import checkpoint as ckpt
from tests.orchestration.multinode_helpers import ByteCountingRelay, RayCluster, SeaweedS3, private_tmpfs
from tests.orchestration.test_train_integration import REPO

pytestmark = pytest.mark.integration

BUCKET = "asymflow-nodes"
NODE_CPUS = 2  # two ranks per node in the 4-worker resume


@dataclass
class Nodes:
    cluster: RayCluster
    s3: SeaweedS3
    relays: list[ByteCountingRelay]  # per worker node: bytes its S3 client received
    temp_dirs: list[Path]  # per worker node: its TMPDIR (restore copies live there)
    node_local: Path  # the second node sees a private, empty tmpfs here


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """SeaweedFS, a head (the driver side, real S3 endpoint) and 2 worker nodes with their own TMPDIR and S3 relay,
    the second in a mount namespace with a tmpfs over `node_local`. SeaweedFS starts beside the Ray nodes; the nodes
    start one after the other (two raylets registering at once on one IP confuse the node lookup)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("nodes")
    node_local = root / "node-local"
    node_local.mkdir()
    s3 = SeaweedS3(root / "weed")
    s3.reserve_ports()
    relays = [ByteCountingRelay(s3.ports["s3"]) for _ in range(2)]
    cluster = RayCluster(root / "cluster", extra_env=s3.env)
    temp_dirs = [root / f"tmp{i}" for i in range(2)]
    try:
        with ThreadPoolExecutor(1) as pool:
            weed = pool.submit(s3.start)
            cluster.start_head()
            for i, (relay, temp) in enumerate(zip(relays, temp_dirs)):
                temp.mkdir()
                env = {"AWS_ENDPOINT_URL": relay.endpoint, "AWS_ENDPOINT_URL_S3": relay.endpoint,
                       "TMPDIR": str(temp)}
                cluster.add_worker(NODE_CPUS, env=env, wrapper=private_tmpfs(node_local) if i == 1 else None)
            weed.result()
        s3.filesystem().mkdir(BUCKET)
        yield Nodes(cluster, s3, relays, temp_dirs, node_local)
    finally:
        cluster.stop()
        s3.stop()
        for relay in relays:
            relay.stop()


def _train(nodes: Nodes, dataset: str, storage: str, name: str, workers: int, steps: int,
           timeout: float = 600) -> subprocess.CompletedProcess:
    sets = ["log.wandb_mode=offline", "sample.every=0", "run.placement_strategy=SPREAD", "run.max_failures=3",
            "checkpoint.upload_backoff_s=0.2"]
    args = ["train", str(REPO / "configs" / "tiny.yaml"), "--data", dataset, "--storage", storage, "--name", name,
            "--steps", str(steps), "--workers", str(workers), "--address", nodes.cluster.address,
            *(a for item in sets for a in ("--set", item))]
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=nodes.cluster.env,
                          capture_output=True, text=True, timeout=timeout)
    (nodes.cluster.root / f"{name}-{workers}-workers.out").write_text(proc.stdout + proc.stderr)  # whole log, kept
    return proc


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"asymflow train exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_resume_from_object_storage_downloads_one_checkpoint_per_node(dataset, nodes):
    """1 worker checkpoints step 1 to S3; the resume with 4 workers (two per node) fetches what DeepSpeed's
    universal conversion needs once per node: each node's bytes are at least those files and well under the two
    copies per node that per-rank downloads cost; both nodes converted their own copy, with no retry."""
    storage = f"s3://{BUCKET}/runs"
    out = _ok(_train(nodes, dataset, storage, "resume", workers=1, steps=1))
    assert "storage probe failed" not in out
    fs = nodes.s3.filesystem()
    step_dir = f"{BUCKET}/runs/resume/checkpoints/{ckpt.step_name(1)}"
    sizes = {p[len(step_dir) + 1:]: info["size"] for p, info in fs.find(step_dir, detail=True).items()}
    needed = sum(size for name, size in sizes.items() if name.startswith(ckpt.ENGINE_TAG + "/")
                 or name in (ckpt.STATE, ckpt.EMA))
    assert needed > 1_000_000, sizes  # the checkpoint dwarfs the run's other S3 traffic (listings, polls, state)
    for relay in nodes.relays:
        relay.reset()

    t0 = time.time()
    out = _ok(_train(nodes, dataset, storage, "resume", workers=4, steps=2))
    took = time.time() - t0
    received = [relay.received for relay in nodes.relays]
    print(f"resume with 4 ranks on 2 nodes ({took:.0f}s): checkpoint {sum(sizes.values())} bytes, needed "
          f"{needed}; bytes received per node {received}")
    assert fs.exists(f"{BUCKET}/runs/resume/checkpoints/{ckpt.step_name(2)}/{ckpt.COMPLETE}")
    assert "storage probe failed" not in out and "[FailurePolicy] RETRY" not in out  # right the first time
    for got in received:
        assert needed <= got < 1.4 * needed, (received, needed)
    converted = [list(temp.glob(f"asymflow-restore/*/{ckpt.UNIVERSAL}/COMPLETE")) for temp in nodes.temp_dirs]
    assert all(len(c) == 1 for c in converted), converted


def test_node_local_run_directory_stops_before_step_0_naming_node_and_path(dataset, nodes):
    """Run directory and dataset under a path the second node sees as its own empty tmpfs: one `error:` line naming
    a node (IP, host, Ray node id), the probe file and the dataset index; Ray Train's failure policy never retries
    (run.max_failures=3); no step run, no checkpoint."""
    data = nodes.node_local / "data"
    shutil.copytree(dataset, data)
    storage = nodes.node_local / "runs"
    t0 = time.time()
    proc = _train(nodes, str(data), str(storage), "probe", workers=2, steps=2)
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-6000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-6000:]
    error = errors[0]
    assert "storage probe failed before step 0" in error
    assert f"{storage / 'probe'}/.storage-probe-" in error and str(data / "index.json") in error
    node = r"node 127\.0\.0\.1 \(host [^,]+, Ray node ([0-9a-f]{8})\)"
    assert len(set(re.findall(node, error))) == 2, error  # rank 0's node and the node that sees other storage
    assert "storage probe failed" in out and "[FailurePolicy] RETRY" not in out, out[-6000:]  # not retried
    assert "step 1/" not in out and not (storage / "probe" / "checkpoints").exists()
    print(f"probe failure reported in {took:.0f}s: {error}")
