"""Checkpoint layout on local or fsspec storage: staging name, `COMPLETE` marker written last, latest, keep-last-k."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
ENGINE_TAG = "engine"  # DeepSpeed's tag: its files live in step-N/engine/
UNIVERSAL = "universal"  # ds_to_universal output, next to the engine files
_STEP_RE = re.compile(r"^step-(\d{8})$")
_STAGING_PREFIX = ".staging-"


def _join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def checkpoints_root(run_dir: str) -> str:
    return _join(run_dir, CHECKPOINTS)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return _join(checkpoints_root(run_dir), step_name(step))


def staging_dir(run_dir: str, step: int) -> str:
    """Where a checkpoint is written before it is committed; never read by `latest_checkpoint`."""
    return _join(checkpoints_root(run_dir), _STAGING_PREFIX + step_name(step))


def is_local(path: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def complete_steps(run_dir: str) -> list[int]:
    """Steps of committed checkpoints (with `COMPLETE`), ascending."""
    fs, root = _fs(checkpoints_root(run_dir))
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        match = _STEP_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match and fs.exists(_join(entry, COMPLETE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: str) -> str | None:
    """The committed checkpoint with the highest step, or None; partial ones are never returned."""
    steps = complete_steps(run_dir)
    return checkpoint_dir(run_dir, steps[-1]) if steps else None


def clean_partial(run_dir: str) -> list[str]:
    """Delete staging directories and step directories without `COMPLETE` (a write that was interrupted)."""
    fs, root = _fs(checkpoints_root(run_dir))
    if not fs.exists(root):
        return []
    removed = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        partial_step = _STEP_RE.match(name) and not fs.exists(_join(entry, COMPLETE))
        if name.startswith(_STAGING_PREFIX) or partial_step:
            fs.rm(entry, recursive=True)
            removed.append(name)
    return removed


def apply_keep_last(run_dir: str, keep: int) -> list[int]:
    """Delete all but the `keep` newest committed checkpoints (keep ≥ 2, so a bad latest has a fallback)."""
    if keep < 2:
        raise ValueError(f"checkpoint.keep must be ≥ 2, got {keep}")
    steps = complete_steps(run_dir)
    fs, _ = _fs(run_dir)
    dropped = steps[:-keep]
    for step in dropped:
        path = _fs(checkpoint_dir(run_dir, step))[1]
        # Remove the marker first: an interrupted delete leaves a partial checkpoint, never a corrupt "complete" one.
        fs.rm(_join(path, COMPLETE))
        fs.rm(path, recursive=True)
    return dropped


def local_engine_dir(run_dir: str, step: int) -> str:
    """Local directory DeepSpeed writes the engine files into (DeepSpeed only writes local paths).

    Local storage: the staging directory itself. Remote storage: a temporary local directory whose files
    `commit_checkpoint` uploads; on multi-node clusters each node uploads what its ranks wrote.
    """
    if is_local(run_dir):
        return _fs(staging_dir(run_dir, step))[1]
    return os.path.join(tempfile.gettempdir(), "asymflow-staging", run_dir.replace("://", "_").replace("/", "_"), step_name(step))


def begin_checkpoint(run_dir: str, step: int) -> str:
    """Create an empty staging directory for `step` (rank 0, before any rank writes); returns its path."""
    fs, path = _fs(staging_dir(run_dir, step))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    local = local_engine_dir(run_dir, step)
    if not is_local(run_dir):
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
    return staging_dir(run_dir, step)


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    with fs.open(p, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file at a local path or URL (contiguous CPU copies; shared storage is not allowed)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_bytes(path, save_safetensors_bytes(clean, metadata=metadata))


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes(read_bytes(path))


def write_state(path: str, state: dict[str, Any]) -> None:
    write_bytes(path, json.dumps(state, indent=2, sort_keys=True).encode())


def read_state(checkpoint: str) -> dict[str, Any]:
    return json.loads(read_bytes(_join(checkpoint, STATE)))


def commit_checkpoint(run_dir: str, step: int, keep: int) -> str:
    """Rank 0, after every rank finished writing: upload (remote), rename staging → step-N, write `COMPLETE`
    last, then drop old checkpoints. A crash at any point leaves at worst a partial checkpoint that is ignored."""
    final = checkpoint_dir(run_dir, step)
    fs, final_path = _fs(final)
    _, staging_path = _fs(staging_dir(run_dir, step))
    if not is_local(run_dir):
        fs.put(local_engine_dir(run_dir, step) + "/", staging_path + "/", recursive=True)
    if fs.exists(final_path):  # a partial leftover from an interrupted attempt at the same step
        fs.rm(final_path, recursive=True)
    fs.mv(staging_path, final_path, recursive=True)
    write_bytes(_join(final, COMPLETE), b"")
    apply_keep_last(run_dir, keep)
    if not is_local(run_dir):
        shutil.rmtree(local_engine_dir(run_dir, step), ignore_errors=True)
    return final


def local_checkpoint_copy(checkpoint: str) -> str:
    """A local path holding `checkpoint`'s files (itself when local; a downloaded copy otherwise)."""
    if is_local(checkpoint):
        return _fs(checkpoint)[1]
    fs, path = _fs(checkpoint)
    local = os.path.join(tempfile.gettempdir(), "asymflow-restore", checkpoint.replace("://", "_").replace("/", "_"))
    if not os.path.exists(os.path.join(local, COMPLETE)):
        shutil.rmtree(local, ignore_errors=True)
        fs.get(path + "/", local + "/", recursive=True)
    return local


@dataclass(frozen=True)
class Restored:
    """What a resume needs from the latest checkpoint."""

    path: str
    step: int
    state: dict[str, Any]


def find_restore_point(run_dir: str) -> Restored | None:
    """The latest complete checkpoint and its state, or None (then the run starts from the pretrained init)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    state = read_state(path)
    return Restored(path=path, step=int(state["step"]), state=state)
