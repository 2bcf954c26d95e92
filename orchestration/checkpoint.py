"""Checkpoint layout on local or fsspec storage: staging name, `COMPLETE` marker written last, latest, keep-last-k.

Local storage writes under `.staging-step-N` and renames. Object stores (s3://, gs://, memory://) have no atomic
rename (a "move" is a copy per object), so there every file goes straight into `step-N/` and the single `COMPLETE`
object, written after everything else, is the commit: a listing never treats a step without it as complete.
Uploads are retried with exponential backoff and fail with `StorageError` after the budget.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"  # written by checkpoints before issue 12; now read from the engine files
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
    """Where a checkpoint is written before it is committed; never read by `latest_checkpoint` before `COMPLETE`.
    Object stores: the final directory itself (no rename there; the `COMPLETE` object alone commits)."""
    if not is_local(run_dir):
        return checkpoint_dir(run_dir, step)
    return _join(checkpoints_root(run_dir), _STAGING_PREFIX + step_name(step))


class StorageError(RuntimeError):
    """A storage operation still failing after the retry budget (the message names the path, never credentials)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries with exponential backoff `backoff_s · 2^i`, capped at `max_backoff_s`."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


DEFAULT_RETRY = RetryPolicy()


def with_retries(fn: Callable[[], Any], what: str, policy: RetryPolicy = DEFAULT_RETRY) -> Any:
    """Run `fn`, retrying transient failures (OSError and the S3 client's errors) with exponential backoff."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError):
            raise  # not transient: retrying cannot help
        except Exception as exc:  # noqa: BLE001  (s3fs/botocore raise several unrelated classes)
            if attempt == policy.attempts - 1:
                raise StorageError(
                    f"{what} failed after {policy.attempts} attempts ({type(exc).__name__}: {exc}); "
                    "check the storage URL, the endpoint and that credentials are set in the environment"
                ) from exc
            time.sleep(min(policy.backoff_s * 2**attempt, policy.max_backoff_s))


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


def local_engine_dir(run_dir: str, step: int, rank: int | None = None) -> str:
    """Local directory DeepSpeed writes the engine files into (DeepSpeed only writes local paths).

    Local storage: the staging directory itself. Remote storage: a temporary local directory per rank (ranks may
    sit on different nodes), whose files that rank uploads with `upload_engine_files` before the commit.
    """
    if is_local(run_dir):
        return _fs(staging_dir(run_dir, step))[1]
    base = os.path.join(tempfile.gettempdir(), "asymflow-staging", run_dir.replace("://", "_").replace("/", "_"),
                        step_name(step))
    return base if rank is None else os.path.join(base, f"rank-{rank}")


def upload_engine_files(run_dir: str, step: int, rank: int, policy: RetryPolicy = DEFAULT_RETRY) -> int:
    """Remote storage: upload the engine files this rank wrote into the checkpoint (each file retried with
    backoff), then delete the local copy. No-op on local storage. Returns the number of files uploaded."""
    if is_local(run_dir):
        return 0
    local = local_engine_dir(run_dir, step, rank)
    fs, target = _fs(staging_dir(run_dir, step))
    count = 0
    for root, _, files in os.walk(local):
        for name in sorted(files):
            src = os.path.join(root, name)
            dst = _join(target, os.path.relpath(src, local).replace(os.sep, "/"))
            with_retries(lambda: fs.put_file(src, dst), f"upload of checkpoint file {dst}", policy)
            count += 1
    shutil.rmtree(local, ignore_errors=True)
    return count


def begin_checkpoint(run_dir: str, step: int) -> str:
    """Create an empty staging directory for `step` (rank 0, before any rank writes); returns its path."""
    fs, path = _fs(staging_dir(run_dir, step))
    if fs.exists(path):
        if fs.exists(_join(path, COMPLETE)):  # object stores write in place: un-commit before deleting
            fs.rm(_join(path, COMPLETE))
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    if not is_local(run_dir):
        shutil.rmtree(local_engine_dir(run_dir, step), ignore_errors=True)
    return staging_dir(run_dir, step)


def write_bytes(path: str, data: bytes, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    """One object/file, retried with backoff (a failed attempt is simply rewritten whole)."""
    fs, p = _fs(path)

    def write() -> None:
        with fs.open(p, "wb") as f:
            f.write(data)

    with_retries(write, f"write of {path}", policy)


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


def commit_checkpoint(run_dir: str, step: int, keep: int, policy: RetryPolicy = DEFAULT_RETRY) -> str:
    """Rank 0, after every rank finished writing (and, remote, uploading): local storage renames staging → step-N;
    then `COMPLETE` is written last and old checkpoints are dropped. A crash at any point leaves at worst a partial
    checkpoint that is ignored."""
    final = checkpoint_dir(run_dir, step)
    fs, final_path = _fs(final)
    if is_local(run_dir):
        _, staging_path = _fs(staging_dir(run_dir, step))
        if fs.exists(final_path):  # a partial leftover from an interrupted attempt at the same step
            fs.rm(final_path, recursive=True)
        fs.mv(staging_path, final_path, recursive=True)
    write_bytes(_join(final, COMPLETE), b"", policy)
    apply_keep_last(run_dir, keep)
    if not is_local(run_dir):
        shutil.rmtree(local_engine_dir(run_dir, step), ignore_errors=True)
    return final


def restore_cache_dir(checkpoint: str, state: bytes) -> str:
    """This machine's directory for copies of remote `checkpoint` whose state.json holds `state`.

    Keyed by URL *and* the checkpoint's state.json: the same URL can name another checkpoint later (a run deleted
    and restarted under the same name, another bucket behind the same endpoint URL), and a stale copy would restore
    the wrong weights without any error."""
    fingerprint = hashlib.sha256(state).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "asymflow-restore",
                        checkpoint.replace("://", "_").replace("/", "_") + "-" + fingerprint)


@dataclass(frozen=True)
class Fetched:
    """A local copy of (part of) a remote checkpoint, and what this call downloaded for it."""

    path: str
    files: int
    bytes: int


def fetch_checkpoint(checkpoint: str, wanted: Callable[[str], bool] | None = None,
                     policy: RetryPolicy = DEFAULT_RETRY) -> Fetched:
    """Download the files of committed remote `checkpoint` that `wanted(relative name)` selects (all when None) into
    `restore_cache_dir`, each file at most once per machine.

    Every file is downloaded under a per-process name and renamed into place whole, so a file found there is a
    complete copy of this checkpoint's file and is reused; several processes (or Ray nodes sharing one /tmp) may
    fetch into the same directory at once."""
    fs, path = _fs(checkpoint)
    local = restore_cache_dir(checkpoint, read_bytes(_join(checkpoint, STATE)))
    root = path.rstrip("/") + "/"
    listing = with_retries(lambda: fs.find(root, detail=True), f"listing of {checkpoint}", policy)
    sizes = {name[len(root):]: int(info.get("size") or 0) for name, info in listing.items()
             if name.startswith(root) and info.get("type", "file") == "file" and not name.endswith("/")}
    if COMPLETE not in sizes:
        raise StorageError(f"{checkpoint} has no {COMPLETE} marker: not a committed checkpoint")
    files = total = 0
    for name, size in sorted(sizes.items()):
        if wanted is not None and not wanted(name):
            continue
        target = os.path.join(local, *name.split("/"))
        if os.path.isfile(target) and os.path.getsize(target) == size:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        part = f"{target}.part-{os.getpid()}"
        with_retries(lambda: fs.get_file(root + name, part), f"download of {checkpoint}/{name}", policy)
        os.replace(part, target)
        files, total = files + 1, total + size
    return Fetched(local, files, total)


def local_engine_copy(checkpoint: str) -> str:
    """A local directory holding `checkpoint`'s DeepSpeed engine files (under ENGINE_TAG/): the checkpoint itself
    when local, else this machine's cached copy (each file fetched at most once)."""
    if is_local(checkpoint):
        return _fs(checkpoint)[1]
    return fetch_checkpoint(checkpoint, lambda name: name.startswith(ENGINE_TAG + "/")).path


def local_checkpoint_copy(checkpoint: str) -> str:
    """A local path holding all of `checkpoint`'s files (itself when local; this machine's cached copy otherwise)."""
    if is_local(checkpoint):
        return _fs(checkpoint)[1]
    return fetch_checkpoint(checkpoint).path


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
