"""Checkpoint layout: staging + COMPLETE last, latest = highest complete step, partial ones ignored and cleaned, keep-last-k."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestration import checkpoint as ckpt


def _write(run_dir: str, step: int, keep: int = 2) -> str:
    staging = ckpt.begin_checkpoint(run_dir, step)
    ckpt.save_tensors(f"{staging}/{ckpt.TRAINABLE}", {"w": torch.full((2,), float(step))})
    ckpt.write_state(f"{staging}/{ckpt.STATE}", {"step": step})
    return ckpt.commit_checkpoint(run_dir, step, keep)


def test_layout_and_latest(tmp_path):
    run = str(tmp_path / "run")
    path = _write(run, 2)
    assert path == f"{run}/checkpoints/step-00000002"
    assert sorted(p.name for p in Path(path).iterdir()) == ["COMPLETE", "state.json", "trainable.safetensors"]
    _write(run, 4)
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step-00000004"
    restored = ckpt.find_restore_point(run)
    assert restored.step == 4 and restored.state == {"step": 4}
    assert torch.equal(ckpt.load_tensors(f"{restored.path}/{ckpt.TRAINABLE}")["w"], torch.full((2,), 4.0))


def test_partial_checkpoints_are_ignored_then_cleaned(tmp_path):
    run = str(tmp_path / "run")
    _write(run, 2)
    ckpt.begin_checkpoint(run, 4)  # killed while writing: staging only
    Path(f"{run}/checkpoints/step-00000006").mkdir()  # killed between rename and COMPLETE
    assert ckpt.complete_steps(run) == [2]
    assert ckpt.latest_checkpoint(run).endswith("step-00000002")
    assert sorted(ckpt.clean_partial(run)) == [".staging-step-00000004", "step-00000006"]
    assert sorted(p.name for p in Path(f"{run}/checkpoints").iterdir()) == ["step-00000002"]


def test_keep_last_k(tmp_path):
    run = str(tmp_path / "run")
    for step in (2, 4, 6, 8):
        _write(run, step, keep=3)
    assert ckpt.complete_steps(run) == [4, 6, 8]
    with pytest.raises(ValueError, match="≥ 2"):
        ckpt.apply_keep_last(run, 1)


def test_rewriting_a_partial_step_replaces_it(tmp_path):
    run = str(tmp_path / "run")
    Path(f"{run}/checkpoints/step-00000002").mkdir(parents=True)
    (Path(f"{run}/checkpoints/step-00000002") / "junk").write_text("x")
    _write(run, 2)
    assert not Path(f"{run}/checkpoints/step-00000002/junk").exists()
    assert ckpt.complete_steps(run) == [2]


def test_empty_run_has_no_restore_point(tmp_path):
    assert ckpt.find_restore_point(str(tmp_path / "nothing")) is None
    assert ckpt.clean_partial(str(tmp_path / "nothing")) == []


def test_fsspec_memory_storage():
    """The same layout through an fsspec URL (memory://), as for s3:// storage."""
    run = "memory://bucket/run"
    staging = ckpt.begin_checkpoint(run, 2)
    ckpt.write_state(f"{staging}/{ckpt.STATE}", {"step": 2})
    ckpt.commit_checkpoint(run, 2, keep=2)
    assert ckpt.complete_steps(run) == [2]
    assert ckpt.find_restore_point(run).state == {"step": 2}


def test_restore_copy_of_a_url_follows_what_the_url_holds_now():
    """A downloaded copy is reused only for the same checkpoint: a run recreated under the same URL (or another
    store behind the same endpoint) must not restore the stale copy's weights."""
    import fsspec

    run = "memory://stale-copy/run"
    fs = fsspec.filesystem("memory")
    copies = []
    for value in (1.0, 2.0):
        if fs.exists("/stale-copy"):
            fs.rm("/stale-copy", recursive=True)
        staging = ckpt.begin_checkpoint(run, 2)
        ckpt.save_tensors(f"{staging}/{ckpt.TRAINABLE}", {"w": torch.full((2,), value)})
        ckpt.write_state(f"{staging}/{ckpt.STATE}", {"step": 2, "time": value})
        ckpt.commit_checkpoint(run, 2, keep=2)
        copies.append(ckpt.local_checkpoint_copy(ckpt.checkpoint_dir(run, 2)))
        assert torch.equal(ckpt.load_tensors(f"{copies[-1]}/{ckpt.TRAINABLE}")["w"], torch.full((2,), value))
    assert copies[0] != copies[1]


def test_trainable_weights_of_an_older_checkpoint(tmp_path):
    """Checkpoints written before issue 12 carry `trainable.safetensors` (and may lack engine files, as exports'
    sources did): `--weights trainable` still reads that file; without it or engine files the error names the path."""
    from orchestration.artifacts import load_weights

    run = str(tmp_path / "run")
    path = _write(run, 2)
    assert torch.equal(load_weights(path, "trainable")["w"], torch.full((2,), 2.0))
    Path(path, ckpt.TRAINABLE).unlink()
    with pytest.raises(FileNotFoundError, match=r"engine does not exist \(no DeepSpeed engine files"):
        load_weights(path, "trainable")
