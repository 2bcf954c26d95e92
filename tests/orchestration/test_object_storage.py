"""Shards and checkpoints on a real S3-compatible object store (SeaweedFS `weed server -s3`, every port on 127.0.0.1).

Issue 7 item 3: the checkpoint commit stays atomic on object storage (a step without the `COMPLETE` object is never
listed as complete), failing uploads are retried with backoff and fail with a clear error after the budget, a run
reading shards from s3:// and checkpointing to s3:// survives a SIGKILLed worker with the same final weights and
data order as an uninterrupted local run, and the made-up credentials (given only through the environment) appear
in no object, log or config.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestration import checkpoint as ckpt
from tests.orchestration.multinode_helpers import SeaweedS3, listening_addresses
from tests.orchestration.test_train_integration import (
    REPO, STEPS, _assert_same, _final_tensors, _keys_by_step, _train_workers,
)

BUCKET = "asymflow-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server whose credentials are exported to this process's environment only while the module runs
    (Ray workers started here inherit them; nothing else carries them)."""
    server = SeaweedS3(tmp_path_factory.mktemp("weed")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.filesystem().mkdir(BUCKET)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _fresh_fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


# ---------------------------------------------------------------------------------------------- storage layer


@pytest.mark.integration
def test_server_listens_on_loopback_only(s3):
    assert listening_addresses(s3.proc.pid) == {"127.0.0.1"}


@pytest.mark.integration
def test_commit_is_atomic_on_object_storage(s3):
    """Files go straight into step-N/ (no rename on S3); until `COMPLETE` is written last the step is not listed,
    and a partial step is cleaned and rewritten."""
    run = f"s3://{BUCKET}/atomic/run"
    staging = ckpt.begin_checkpoint(run, 2)
    assert staging == ckpt.checkpoint_dir(run, 2)
    ckpt.save_tensors(f"{staging}/{ckpt.TRAINABLE}", {"w": torch.ones(3)})
    ckpt.write_state(f"{staging}/{ckpt.STATE}", {"step": 2})
    local = Path(ckpt.local_engine_dir(run, 2, rank=0))
    (local / ckpt.ENGINE_TAG).mkdir(parents=True)
    (local / ckpt.ENGINE_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    assert ckpt.upload_engine_files(run, 2, rank=0) == 1
    assert not local.exists()
    # Everything but the marker is there: not complete, not a restore point.
    assert _fresh_fs().exists(f"{BUCKET}/atomic/run/checkpoints/step-00000002/engine/"
                              "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert ckpt.complete_steps(run) == [] and ckpt.find_restore_point(run) is None
    ckpt.commit_checkpoint(run, 2, keep=2)
    assert ckpt.complete_steps(run) == [2]
    assert ckpt.find_restore_point(run).state == {"step": 2}
    copy = ckpt.local_checkpoint_copy(ckpt.checkpoint_dir(run, 2))
    assert (Path(copy) / ckpt.ENGINE_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt").stat().st_size == 1000

    ckpt.begin_checkpoint(run, 4)  # killed mid-upload: a step-4 prefix without COMPLETE
    ckpt.write_state(f"{ckpt.staging_dir(run, 4)}/{ckpt.STATE}", {"step": 4})
    assert ckpt.complete_steps(run) == [2]
    assert ckpt.clean_partial(run) == ["step-00000004"]
    for step in (4, 6, 8):
        ckpt.write_state(f"{ckpt.begin_checkpoint(run, step)}/{ckpt.STATE}", {"step": step})
        ckpt.commit_checkpoint(run, step, keep=2)
    assert ckpt.complete_steps(run) == [6, 8]


@pytest.mark.integration
def test_stop_request_on_object_storage(s3):
    """The stop marker round-trips through S3, and a poller whose client listed the run directory before the marker
    existed still sees it (s3fs would otherwise answer from its cached listing)."""
    from orchestration.stop_request import StopPoller, clear_stop_request, read_stop_request, request_stop

    run = f"s3://{BUCKET}/stop/run"
    request_stop(run, source="setup")
    clear_stop_request(run)
    poller = StopPoller(run, every_s=0.01)
    poller.fs.ls(f"{BUCKET}/stop/run")  # fills the listing cache without the marker
    assert not poller.requested()
    request = request_stop(run, source="asymflow stop")
    time.sleep(0.02)
    assert poller.requested() and read_stop_request(run) == request
    assert clear_stop_request(run) and read_stop_request(run) is None
    time.sleep(0.02)
    assert not poller.requested()


@pytest.mark.integration
def test_failing_uploads_retry_with_backoff_then_fail_clearly(s3, tmp_path):
    """An endpoint that is down for a while is retried until it comes up; one that stays down fails after the
    budget with an error naming the path and attempts (and no credential)."""
    late = SeaweedS3(tmp_path / "late")  # ports reserved now, server started 3 s into the upload's retries
    late.reserve_ports()
    policy = ckpt.RetryPolicy(attempts=8, backoff_s=0.5, max_backoff_s=2.0)

    def write_with_late_server() -> float:
        import fsspec

        fs = fsspec.filesystem("s3", key=late.access_key, secret=late.secret_key, endpoint_url=late.endpoint,
                               skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1},
                                                                        "connect_timeout": 1})
        t0 = time.time()
        ckpt.with_retries(lambda: fs.mkdir(BUCKET) if not fs.exists(BUCKET) else None, "bucket", policy)
        ckpt.with_retries(lambda: fs.pipe(f"{BUCKET}/x/COMPLETE", b""), "write of COMPLETE", policy)
        return time.time() - t0

    starter = threading.Timer(3.0, late.start)
    starter.start()
    try:
        elapsed = write_with_late_server()
        assert elapsed >= 2.5  # it really waited for the server through retries
        assert late.filesystem().exists(f"{BUCKET}/x/COMPLETE")
    finally:
        starter.join()
        late.stop()

    # The same server, now gone for good: StorageError after the budget.
    import fsspec

    dead = fsspec.filesystem("s3", key=late.access_key, secret=late.secret_key, endpoint_url=late.endpoint,
                             skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1},
                                                                      "connect_timeout": 1})
    t0 = time.time()
    with pytest.raises(ckpt.StorageError, match=r"write of s3://b/k failed after 3 attempts") as err:
        ckpt.with_retries(lambda: dead.pipe(f"{BUCKET}/y", b"1"), "write of s3://b/k",
                          ckpt.RetryPolicy(attempts=3, backoff_s=0.2))
    assert time.time() - t0 >= 0.6  # 0.2 + 0.4 of backoff
    assert late.secret_key not in str(err.value) and late.access_key not in str(err.value)


# ---------------------------------------------------------------------------------------------- training on S3


def _s3_keys(fs, run: str) -> dict[int, list[str]]:
    out = {}
    for path in fs.find(f"{run}/keys"):
        record = json.loads(fs.cat(path))
        out[record["step"]] = record["keys"]
    return out


class S3Killer(threading.Thread):
    """SIGKILLs one training worker once `after_steps` per-step key objects exist in the bucket."""

    def __init__(self, run: str, after_steps: int):
        super().__init__(daemon=True)
        self.run_path, self.after_steps = run, after_steps
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        fs = _fresh_fs()
        while not self.stop.is_set():
            try:
                n = len(fs.ls(f"{self.run_path}/keys", refresh=True))
            except FileNotFoundError:
                n = 0
            if n >= self.after_steps and _train_workers():
                self.killed_pid = _train_workers()[-1].pid
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_local(s3):
    """A local Ray (127.0.0.1) started after the credentials are in the environment, with its own temp dir."""
    import shutil
    import tempfile

    import ray

    temp = Path(tempfile.mkdtemp(prefix="afs3-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp))
    yield temp
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
def test_training_on_s3_shards_and_checkpoints_survives_sigkill(dataset, s3, ray_local, tmp_path, capfd):
    """Shards read from s3://, checkpoints and keys written to s3://, one worker SIGKILLed after 3 steps: the final
    trainable weights and EMA equal those of an uninterrupted run on local disk, step by step the same samples,
    and the lost steps are counted. The credentials appear nowhere in the bucket, the Ray logs or the output."""
    from orchestration.artifacts import load_weights
    from orchestration.config import load_config
    from orchestration.launcher import launch

    fs = _fresh_fs()
    fs.put(dataset.rstrip("/") + "/", f"{BUCKET}/data/", recursive=True)

    def config(data: str, storage: str, name: str):
        return load_config(str(REPO / "configs" / "tiny.yaml"), [
            f"data.path={data}", f"run.storage={storage}", f"run.name={name}", f"train.steps={STEPS}",
            "train.workers=2", "log.wandb_mode=offline", "sample.every=0", "checkpoint.upload_backoff_s=0.2"])

    local = launch(config(dataset, str(tmp_path), "local"))
    assert local.error is None, local.error

    run = f"{BUCKET}/runs/s3run"
    killer = S3Killer(run, after_steps=3)
    killer.start()
    try:
        result = launch(config(f"s3://{BUCKET}/data", f"s3://{BUCKET}/runs", "s3run"))
    finally:
        killer.stop.set()
    assert result.error is None, result.error
    assert killer.killed_pid, "the killer never found a worker"

    steps = ckpt.complete_steps(f"s3://{BUCKET}/runs/s3run")
    assert steps[-1] == STEPS and len(steps) == 2  # keep-last-2 on S3 too
    final = ckpt.local_checkpoint_copy(ckpt.checkpoint_dir(f"s3://{BUCKET}/runs/s3run", STEPS))
    reference = _final_tensors(tmp_path / "local")
    _assert_same(reference[0], load_weights(ckpt.checkpoint_dir(f"s3://{BUCKET}/runs/s3run", STEPS), "trainable"))
    _assert_same(reference[1], ckpt.load_tensors(f"{final}/{ckpt.EMA}"))
    assert _s3_keys(fs, run) == _keys_by_step(tmp_path / "local")
    state = ckpt.read_state(ckpt.checkpoint_dir(f"s3://{BUCKET}/runs/s3run", STEPS))
    assert state["steps_lost"] >= 1 and state["goodput"]["interruptions"] >= 1
    assert not any(".staging" in p for p in fs.find(f"{run}/checkpoints"))

    # Credentials: only in the environment. Not in any object, not in Ray's logs, not in what the run printed.
    secrets_ = [s3.access_key.encode(), s3.secret_key.encode()]
    fs = _fresh_fs()
    objects = fs.find(BUCKET)
    assert any(p.endswith("/COMPLETE") for p in objects)
    for path in objects:
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:  # a directory marker listed by the server, or an object removed by keep-last-k
            continue
        assert not any(s in data for s in secrets_), f"credential in s3://{path}"
    for path in ray_local.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".out", ".err", ".json", ".txt", ".yaml"}:
            data = path.read_bytes()
            assert not any(s in data for s in secrets_), f"credential in {path}"
    out, err = capfd.readouterr()
    assert s3.secret_key not in out + err and s3.access_key not in out + err
