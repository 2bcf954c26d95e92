"""End-to-end training on a local Ray cluster with DeepSpeed ZeRO-3 on CPU (gloo, 2 workers), real shards and wandb offline.

Acceptance of issue 4: an uninterrupted run, a run with one worker SIGKILLed and a run with one worker SIGTERMed end
with bitwise-identical trainable weights and EMA and the same per-step sample keys; a job killed while writing a
checkpoint resumes from the previous complete one; 2 → 1 worker resume continues the data order exactly; ZeRO-3
partitions halve at 2 workers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestration.processes import train_workers

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _config(dataset: str, storage: Path, name: str, steps: int = STEPS, workers: int = 2, extra: list[str] = ()):
    from orchestration.config import load_config

    return load_config(str(REPO / "configs" / "tiny.yaml"), [
        f"data.path={dataset}", f"run.storage={storage}", f"run.name={name}", f"train.steps={steps}",
        f"train.workers={workers}", "log.wandb_mode=offline", *extra,
    ])


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Last record per step: a step redone after a restart overwrites the lost attempt."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "keys.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        out[record["step"]] = record["keys"]
    return out


def _final_tensors(run_dir: Path, step: int = STEPS) -> tuple[dict, dict]:
    """(trainable weights, EMA) of a checkpoint: the trainable ones consolidated from DeepSpeed's engine files."""
    from orchestration.artifacts import load_weights

    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (ckpt / "COMPLETE").exists(), f"no complete checkpoint at step {step}"
    return load_weights(str(ckpt), "trainable"), load_weights(str(ckpt), "ema")


def _assert_same(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def _train_workers() -> list[psutil.Process]:
    """Ray Train worker processes under this test process (never anything it did not start)."""
    return train_workers()


class Killer(threading.Thread):
    """Sends `sig` to one training worker once `after_steps` steps are logged in keys.jsonl."""

    def __init__(self, run_dir: Path, after_steps: int, sig: int):
        super().__init__(daemon=True)
        self.run_dir, self.after_steps, self.sig = run_dir, after_steps, sig
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        keys = self.run_dir / "keys.jsonl"
        while not self.stop.is_set():
            if keys.exists() and len(keys.read_text().splitlines()) >= self.after_steps:
                workers = _train_workers()
                if workers:
                    self.killed_pid = workers[-1].pid
                    os.kill(self.killed_pid, self.sig)
                    return
            time.sleep(0.02)


def _run(cfg, killer: Killer | None = None):
    from orchestration.launcher import launch

    if killer:
        killer.start()
    try:
        result = launch(cfg)
    finally:
        if killer:
            killer.stop.set()
    assert result.error is None, result.error
    return result


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def plain(dataset, ray_cluster, tmp_path_factory) -> Path:
    """The uninterrupted reference run (2 workers, STEPS steps)."""
    return Path(_run(_config(dataset, tmp_path_factory.mktemp("plain"), "plain")).run_dir)


@pytest.fixture(scope="module")
def halfway_runs(dataset, ray_cluster, tmp_path_factory):
    """Runs stopped after 2 steps, mid-epoch (complete checkpoint: 2), by worker count; built once, tests copy them."""
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            storage = tmp_path_factory.mktemp(f"halfway{workers}")
            runs[workers] = Path(_run(_config(dataset, storage, "run", steps=2, workers=workers)).run_dir)
        return runs[workers]

    return get


@pytest.fixture(scope="module")
def halfway(halfway_runs) -> Path:
    return halfway_runs(2)


def _copy_run(src: Path, storage: Path) -> Path:
    import shutil

    shutil.copytree(src, storage / "run")
    return storage / "run"


def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(dataset, plain, tmp_path):
    from orchestration.checkpoint import read_state

    killed = Killer(tmp_path / "sigkill", after_steps=3, sig=signal.SIGKILL)
    _run(_config(dataset, tmp_path, "sigkill"), killed)
    termed = Killer(tmp_path / "sigterm", after_steps=3, sig=signal.SIGTERM)
    _run(_config(dataset, tmp_path, "sigterm"), termed)
    assert killed.killed_pid and termed.killed_pid, "the killer never found a worker"

    reference = _final_tensors(plain)
    for name in ("sigkill", "sigterm"):
        other = _final_tensors(tmp_path / name)
        _assert_same(reference[0], other[0])
        _assert_same(reference[1], other[1])
        assert _keys_by_step(tmp_path / name) == _keys_by_step(plain)
    assert sorted(_keys_by_step(plain)) == list(range(STEPS))
    # SIGTERM: the just-in-time checkpoint lost no step (no step was trained twice).
    lines = [json.loads(x)["step"] for x in (tmp_path / "sigterm" / "keys.jsonl").read_text().splitlines()]
    assert len(lines) == len(set(lines)) == STEPS
    final_state = read_state(str(tmp_path / "sigterm" / "checkpoints" / f"step-{STEPS:08d}"))
    assert final_state["preemptions"] >= 1 and final_state["steps_lost"] == 0
    # The restarted group continued the same (offline) wandb run.
    wandb_runs = list((tmp_path / "sigterm" / "wandb" / "wandb").glob("offline-run-*"))
    assert wandb_runs and all(p.name.endswith(final_state["wandb_run_id"]) for p in wandb_runs)
    assert (plain / "export" / f"step-{STEPS:08d}" / "diffusion_pytorch_model.safetensors").exists()
    assert (plain / "samples" / "step-00000004" / "00.png").exists()


def test_frozen_weights_are_in_no_checkpoint(plain):
    """The base is rebuilt from the pretrained files at every start: DeepSpeed's model-state files hold no frozen
    parameter fragments and no parameter values (only the B/s buffers), its optimizer states only the trainable
    parameters, and the EMA file trainables + buffers; no file holds a consolidated copy of the trainable weights."""
    import torch
    from safetensors import safe_open

    from orchestration.artifacts import build_model_from_state, load_weights
    from orchestration.checkpoint import read_state

    buffers = {"proj_buffer", "scale_buffer"}
    for step_dir in sorted((plain / "checkpoints").glob("step-*")):
        assert sorted(p.name for p in step_dir.iterdir()) == ["COMPLETE", "ema.safetensors", "engine", "latest",
                                                               "state.json", "zero_to_fp32.py", "zero_to_torch.py"]
        files = sorted((step_dir / "engine").glob("*model_states.pt"))
        assert len(files) == 2  # one per rank
        for path in files:
            state = torch.load(path, weights_only=True, map_location="cpu")
            assert state["frozen_param_fragments"] is None
            assert sum(t.numel() for name, t in state["module"].items() if name not in buffers) == 0
        model, _ = build_model_from_state(read_state(str(step_dir)), {})
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert trainable and frozen
        with safe_open(step_dir / "ema.safetensors", "pt") as f:
            assert set(f.keys()) == trainable | buffers
        # What DeepSpeed's optimizer states hold, consolidated: the trainable set (fp32), not one frozen tensor.
        weights = load_weights(str(step_dir), "trainable")
        assert set(weights) == trainable | buffers
        assert all(weights[n].dtype == torch.float32 for n in trainable)


def test_checkpoint_bytes_are_the_trainable_state(plain):
    """Issue 12: a checkpoint's bytes ≤ 1.15 × the trainable state a resume needs — n trainable parameters × (4 fp32
    weights + 8 Adam m, v + 4 EMA) bytes. Sizes that do not grow with the model are counted apart: the subspace
    buffers (B, s) that every rank's model-state file and the EMA file carry, and the small metadata files."""
    from orchestration.artifacts import build_model_from_state
    from orchestration.checkpoint import read_state

    step_dir = plain / "checkpoints" / f"step-{STEPS:08d}"
    state = read_state(str(step_dir))
    model, _ = build_model_from_state(state, {})
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    sizes = {p.relative_to(step_dir).as_posix(): p.stat().st_size for p in step_dir.rglob("*") if p.is_file()}
    metadata = {name: size for name, size in sizes.items() if not name.endswith((".pt", ".safetensors"))}
    assert sum(metadata.values()) < 100_000, metadata  # state.json, latest, COMPLETE, DeepSpeed's zero_to_fp32.py
    holders = state["world_size"] + 1  # each rank's model-state file and the EMA file hold the buffers
    scaling = sum(sizes.values()) - sum(metadata.values()) - holders * buffer_bytes
    assert scaling <= 1.15 * 16 * n, (scaling / (16 * n), sizes)
    # …and nothing but that state: the optimizer states alone hold ≥ 12 bytes per trainable parameter.
    optim = sum(size for name, size in sizes.items() if name.endswith("optim_states.pt"))
    assert optim >= 12 * n


def test_deepspeed_zero_to_fp32_consolidates_a_checkpoint(plain, tmp_path):
    """DeepSpeed's own script, copied into every checkpoint, run as DeepSpeed documents it (the `latest` file names
    the tag): its fp32 weights are the trainable weights `asymflow sample/export --weights trainable` load, and they
    are the trained ones (not the init the EMA started from)."""
    import torch
    from safetensors.torch import load_file

    from orchestration.artifacts import build_model_from_checkpoint, build_model_from_state, load_weights
    from orchestration.checkpoint import read_state

    step_dir = plain / "checkpoints" / f"step-{STEPS:08d}"
    assert (step_dir / "latest").read_text() == "engine"
    subprocess.run([sys.executable, str(step_dir / "zero_to_fp32.py"), str(step_dir), str(tmp_path),
                    "--safe_serialization", "--exclude_frozen_parameters"], check=True, capture_output=True,
                   timeout=300)
    ours = load_weights(str(step_dir), "trainable")
    theirs = {k: v for f in sorted(tmp_path.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name].float()), name
    # Trained, not the init: LoRA's B starts at zero (peft) and the fully trained modules at the base's weights.
    init, _ = build_model_from_state(read_state(str(step_dir)), {})
    lora_b = [n for n in ours if "lora_B" in n]
    assert lora_b and all(ours[n].abs().sum() > 0 for n in lora_b)
    full = [n for n, p in init.named_parameters() if p.requires_grad and n.split(".")[0] == "x_embedder"]
    assert full and all(not torch.equal(dict(init.named_parameters())[n].detach(), ours[n]) for n in full)
    # What `asymflow sample/export/compare --weights trainable` build: the pixel model holding exactly these.
    model, _, _ = build_model_from_checkpoint(str(step_dir), "trainable")
    state = model.state_dict()
    assert all(torch.equal(state[name], ours[name]) for name in ours)


def test_trainable_weights_of_a_remote_checkpoint(plain, tmp_path):
    """Object storage (fsspec's memory://: no rename, files in place, COMPLETE last): `--weights trainable` fetches
    the engine files alone into this machine's restore cache and consolidates the same weights as locally."""
    import shutil

    import fsspec

    from orchestration import checkpoint as ckpt
    from orchestration.artifacts import load_weights

    step_dir = plain / "checkpoints" / f"step-{STEPS:08d}"
    remote = f"memory://{tmp_path.name}/run/checkpoints/step-{STEPS:08d}"
    fs, root = fsspec.core.url_to_fs(remote)
    for f in sorted(step_dir.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{root}/{f.relative_to(step_dir).as_posix()}", f.read_bytes())
    _assert_same(load_weights(str(step_dir), "trainable"), load_weights(remote, "trainable"))
    copy = Path(ckpt.restore_cache_dir(remote, ckpt.read_bytes(f"{remote}/{ckpt.STATE}")))
    fetched = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    assert fetched == sorted(f"engine/{p.name}" for p in (step_dir / "engine").iterdir())
    fs.rm(root.split("/run/")[0], recursive=True)
    shutil.rmtree(copy)


def test_ema_samples_reach_wandb_as_images(plain):
    """tiny.yaml renders EMA samples every 4 steps; the rendered PNGs are logged to the (offline) wandb run as images."""
    from PIL import Image

    rendered = sorted((plain / "samples").glob("step-*/*.png"))
    assert rendered, "no samples rendered"
    (run,) = (plain / "wandb" / "wandb").glob("offline-run-*")
    logged = sorted(run.glob("files/media/images/samples/ema_*.png"))
    assert len(logged) == len(rendered)
    with Image.open(logged[0]) as im:
        assert im.size == Image.open(rendered[0]).size


def test_checkpoint_interrupted_while_writing_is_ignored(dataset, plain, halfway, tmp_path):
    """What a job killed mid-write leaves (a staging dir, a step dir without COMPLETE) is never loaded: rerunning the
    same command resumes from the previous complete checkpoint and ends where the uninterrupted run ends."""
    run = _copy_run(halfway, tmp_path)
    staging = run / "checkpoints" / ".staging-step-00000004"
    staging.mkdir()
    (staging / "state.json").write_text("{not json")
    partial = run / "checkpoints" / "step-00000004"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"step": 4}))
    (partial / "trainable.safetensors").write_bytes(b"truncated")

    _run(_config(dataset, tmp_path, "run"))
    assert not staging.exists()
    reference = _final_tensors(plain)
    final = _final_tensors(run)
    _assert_same(reference[0], final[0])
    _assert_same(reference[1], final[1])
    assert _keys_by_step(run) == _keys_by_step(plain)
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert steps == [4, STEPS]  # keep-last-2


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_worker_count_continues_the_data_order(dataset, plain, halfway_runs, tmp_path, before, after):
    """2 → 1 and 1 → 2 workers through DeepSpeed's universal checkpoint: the data order continues exactly (every
    sample of epoch 0 once), and ZeRO-3 holds about half the parameters per rank at 2 workers."""
    import torch

    from data_prep.reader import DatasetIndex
    from orchestration.checkpoint import read_state
    from orchestration.data_plan import steps_per_epoch

    run = _copy_run(halfway_runs(before), tmp_path)
    first = read_state(str(run / "checkpoints" / "step-00000002"))["zero_partition"]
    _run(_config(dataset, tmp_path, "run", workers=after))
    keys = _keys_by_step(run)
    assert keys == _keys_by_step(plain)
    index = DatasetIndex.open(dataset)
    per_epoch = steps_per_epoch(index.table, 4)
    assert 2 < per_epoch < STEPS  # the resume is mid-epoch and the run crosses into the next epoch
    epoch_0 = [k for step in range(per_epoch) for k in keys[step]]
    assert len(epoch_0) == len(set(epoch_0)) == 4 * per_epoch
    assert set(epoch_0) <= set(index.table.column("key").to_pylist())
    last = read_state(str(run / "checkpoints" / f"step-{STEPS:08d}"))["zero_partition"]
    assert (first["world_size"], last["world_size"]) == (before, after)
    two, one = (first, last) if before == 2 else (last, first)
    assert one["rank_numel"] == one["full_numel"] == two["full_numel"]
    assert abs(two["rank_numel"] - one["rank_numel"] / 2) <= 1000, (two, one)  # padding: < 1 element per tensor
    trainable, ema = _final_tensors(run)
    assert all(torch.isfinite(t).all() for t in [*trainable.values(), *ema.values()])


def _in_progress_checkpoint(checkpoints: Path) -> Path | None:
    """A checkpoint being written right now: a staging directory, or a step directory not yet marked COMPLETE."""
    try:
        for p in checkpoints.iterdir():
            if p.name.startswith(".staging-") or (p.name.startswith("step-") and not (p / "COMPLETE").exists()):
                return p
    except FileNotFoundError:
        pass
    return None


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job's driver and everything it started (its local Ray included), by PID."""
    root = psutil.Process(proc.pid)
    family = [root, *root.children(recursive=True)]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def test_job_killed_during_checkpoint_write_resumes_from_previous_complete(dataset, plain, tmp_path):
    """The whole job (driver + its Ray + workers) gets SIGKILL while a checkpoint is being written; running the same
    command again ignores the partial checkpoint, resumes from the previous complete one and ends like `plain`."""
    from orchestration.checkpoint import complete_steps

    cmd = [sys.executable, "-m", "orchestration.cli", "train", str(REPO / "configs" / "tiny.yaml"), "--data", dataset,
           "--storage", str(tmp_path), "--name", "run", "--steps", str(STEPS), "--workers", "2",
           "--set", "log.wandb_mode=offline"]
    env = {**os.environ, "RAY_ADDRESS": ""}  # a job of its own: never attach to the test module's Ray
    checkpoints = tmp_path / "run" / "checkpoints"
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = None
    try:
        deadline = time.time() + 600
        while job.poll() is None and time.time() < deadline:
            # the first checkpoint (step 2) may be caught too, but a later one proves "previous complete" is used
            if complete_steps(str(tmp_path / "run")):
                caught = _in_progress_checkpoint(checkpoints)
                if caught is not None:
                    _kill_tree(job)
                    break
            time.sleep(0.002)
    finally:
        if job.poll() is None:
            _kill_tree(job)
    assert caught is not None, "the job finished before a checkpoint write could be interrupted"
    before = complete_steps(str(tmp_path / "run"))
    assert before and before[-1] < STEPS

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"(step {before[-1]}," in rerun.stdout + rerun.stderr  # "resumed from ... (step N, ...": the last complete one
    reference = _final_tensors(plain)
    final = _final_tensors(tmp_path / "run")
    _assert_same(reference[0], final[0])
    _assert_same(reference[1], final[1])
    assert _in_progress_checkpoint(checkpoints) is None
