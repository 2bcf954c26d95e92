"""`train --resume-from STEP` (orchestration.rewind): the chosen checkpoint becomes the latest, later ones are moved
aside (kept), a step without COMPLETE or from another config is refused with nothing moved; local and memory://."""
from __future__ import annotations

import os

import pytest

from orchestration import checkpoint as ckpt
from orchestration.cli import main
from orchestration.config import ConfigError
from orchestration.rewind import rewind_to


def _checkpoint(run_dir: str, step: int, config_hash: str = "h", complete: bool = True) -> None:
    path = ckpt.checkpoint_dir(run_dir, step)
    fs, local = ckpt._fs(path)
    fs.makedirs(local, exist_ok=True)
    ckpt.write_state(f"{path}/{ckpt.STATE}", {"step": step, "config_hash": config_hash})
    if complete:
        ckpt.write_bytes(f"{path}/{ckpt.COMPLETE}", b"")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_rewind_moves_later_checkpoints_aside(kind, tmp_path):
    run_dir = str(tmp_path / "run") if kind == "local" else f"memory://rewind-{os.getpid()}/run"
    for step in (2, 4, 6):
        _checkpoint(run_dir, step)
    _checkpoint(run_dir, 8, complete=False)
    with pytest.raises(ConfigError, match=r"no complete checkpoint at step 8 \(complete: \[2, 4, 6\]\)"):
        rewind_to(run_dir, 8, "h")
    with pytest.raises(ConfigError, match="different config"):
        rewind_to(run_dir, 4, "other")
    assert ckpt.complete_steps(run_dir) == [2, 4, 6]  # refused: nothing moved
    assert rewind_to(run_dir, 4, "h") == [6]
    assert ckpt.complete_steps(run_dir) == [2, 4] and ckpt.find_restore_point(run_dir).step == 4
    fs, root = ckpt._fs(f"{run_dir}/abandoned")
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root) if p.endswith("state.json")] == ["state.json"]
    assert any("step-00000006" in p for p in fs.find(root))


def test_resume_from_and_overwrite_contradict(capsys, tmp_path):
    from pathlib import Path

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert main(["train", tiny, "--resume-from", "4", "--overwrite", "--storage", str(tmp_path)]) == 2
    assert "--resume-from and --overwrite contradict" in capsys.readouterr().err
