"""`train --resume-from STEP`: resume from a chosen complete checkpoint; the later ones are moved aside, not deleted.

The workers always resume from the latest complete checkpoint (that is what makes a restart inside Ray Train safe),
so choosing an earlier one means making it the latest: the later checkpoints move to `RUN_DIR/abandoned/` where
they stay readable (and exportable by hand) but are never listed, restored or pruned by keep-last-k.
"""
from __future__ import annotations

import time

import fsspec

from orchestration import checkpoint as ckpt
from orchestration.config import ConfigError

ABANDONED = "abandoned"


def rewind_to(run_dir: str, step: int, config_hash: str) -> list[int]:
    """Make `step` the latest complete checkpoint of `run_dir`; returns the steps moved aside. Refuses (ConfigError,
    nothing moved) a step without COMPLETE or one written by another config."""
    steps = ckpt.complete_steps(run_dir)
    if step not in steps:
        raise ConfigError(f"--resume-from {step}: {run_dir} has no complete checkpoint at step {step} "
                          f"(complete: {steps or 'none'})")
    saved = ckpt.read_state(ckpt.checkpoint_dir(run_dir, step)).get("config_hash")
    if saved != config_hash:
        raise ConfigError(f"--resume-from {step}: that checkpoint belongs to a different config (hash {saved} vs "
                          f"{config_hash})")
    later = [s for s in steps if s > step]
    fs, _ = fsspec.core.url_to_fs(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s in later:
        source = fsspec.core.url_to_fs(ckpt.checkpoint_dir(run_dir, s))[1]
        target = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/{ABANDONED}/{stamp}/{ckpt.step_name(s)}")[1]
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(source, target, recursive=True)
    return later
