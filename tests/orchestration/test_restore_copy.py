"""Node-local restore copies and the storage probe without Ray: which files a node fetches, each at most once, and
what the probe reports (the two-node versions run in test_node_storage.py)."""
from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from orchestration import checkpoint as ckpt
from orchestration.node_restore import files_for_ranks, node_checkpoint_copy
from orchestration.storage_probe import FATAL, View, describe_mismatch, fatal_error, probe_storage

ENGINE_FILES = {  # what DeepSpeed ZeRO-3 writes for 4 ranks (bf16 optimizer names included)
    **{f"engine/zero_pp_rank_{r}_mp_rank_00_model_states.pt": 100 + r for r in range(4)},
    **{f"engine/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 1000 + r for r in range(4)},
}


def _remote_checkpoint(run: str, step: int = 2) -> str:
    staging = ckpt.begin_checkpoint(run, step)
    for name, size in ENGINE_FILES.items():
        ckpt.write_bytes(f"{staging}/{name}", b"x" * size)
    ckpt.write_bytes(f"{staging}/{ckpt.EMA}", b"e" * 50)
    ckpt.write_bytes(f"{staging}/{ckpt.TRAINABLE}", b"t" * 70)
    ckpt.write_bytes(f"{staging}/zero_to_fp32.py", b"#")
    ckpt.write_state(f"{staging}/{ckpt.STATE}", {"step": step, "run": run})
    return ckpt.commit_checkpoint(run, step, keep=2)


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """This test's own node-local cache (restore copies live under the temp directory)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_node_fetches_its_ranks_files_once_and_the_rest_only_when_asked(node_cache):
    checkpoint = _remote_checkpoint("memory://node-copy/run")
    first = ckpt.fetch_checkpoint(checkpoint, files_for_ranks({2, 3}))
    got = sorted(str(p.relative_to(first.path)) for p in Path(first.path).rglob("*") if p.is_file())
    assert got == sorted([ckpt.COMPLETE, ckpt.EMA, ckpt.STATE, *(n for n in ENGINE_FILES if "_rank_2_" in n
                                                                 or "_rank_3_" in n)])
    assert first.bytes == 102 + 103 + 1002 + 1003 + 50 + len(ckpt.read_bytes(f"{checkpoint}/{ckpt.STATE}"))
    again = ckpt.fetch_checkpoint(checkpoint, files_for_ranks({2, 3}))
    assert (again.path, again.files, again.bytes) == (first.path, 0, 0)  # reused: nothing downloaded twice
    every = ckpt.fetch_checkpoint(checkpoint, files_for_ranks(None))  # a world-size change: all engine files
    assert every.bytes == 100 + 101 + 1000 + 1001
    assert ckpt.fetch_checkpoint(checkpoint).bytes == 70 + 1  # the full copy adds only what is still missing
    assert ckpt.local_checkpoint_copy(checkpoint) == first.path


def test_single_rank_copy_goes_through_the_collective_path(node_cache):
    checkpoint = _remote_checkpoint("memory://node-copy-1/run")
    copy = node_checkpoint_copy(checkpoint, rank=0, node_id="n0", node_label="n0-label", every_rank=False,
                                gather=lambda value: [value])
    assert copy.downloads[0][0] == "n0-label" and copy.downloads[0][1] == 5  # state, EMA, COMPLETE, 2 rank-0 files
    local = ckpt.checkpoint_dir(str(node_cache / "run"), 2)
    assert node_checkpoint_copy(local, 0, "n0", "n0", False, gather=None).path == local  # local: no collective


def test_uncommitted_remote_checkpoint_is_refused(node_cache):
    run = "memory://node-copy-partial/run"
    ckpt.write_state(f"{ckpt.begin_checkpoint(run, 2)}/{ckpt.STATE}", {"step": 2})
    with pytest.raises(ckpt.StorageError, match="no COMPLETE marker"):
        ckpt.fetch_checkpoint(ckpt.checkpoint_dir(run, 2))


def test_probe_passes_alone_and_leaves_no_file(dataset, tmp_path):
    assert probe_storage(str(tmp_path / "run"), dataset, 0, "node-a", gather=lambda v: [v]) is None
    assert list((tmp_path / "run").iterdir()) == []
    fs = fsspec.filesystem("memory")
    assert probe_storage("memory://probe/run", dataset, 0, "node-a", gather=lambda v: [v]) is None
    assert not fs.exists("/probe/run") or fs.ls("/probe/run") == []


def test_probe_message_names_nodes_and_paths():
    a, b = "10.0.0.1 (host a, Ray node 1111aaaa)", "10.0.0.2 (host b, Ray node 2222bbbb)"
    views = [View(0, a, None, "abc" * 10), View(1, a, None, "abc" * 10),
             View(2, b, "no such file", "!FormatError: not a dataset"),
             View(3, b, "no such file", "!FormatError: not a dataset")]
    message = describe_mismatch(views, "/runs/r/.storage-probe-1", "/data/index.json")
    assert f"run directory: ranks 2,3 on node {b} cannot see the probe file /runs/r/.storage-probe-1 that rank 0 " \
           f"on node {a} wrote (no such file)" in message
    assert f"dataset index /data/index.json differs between ranks: ranks 0,1 on node {a}: manifest abcabcabcabc; " \
           f"ranks 2,3 on node {b}: unreadable (FormatError: not a dataset)" in message
    assert "\n" not in message and message.startswith("storage probe failed before step 0")
    assert describe_mismatch(views[:2], "p", "i") is None
    assert str(fatal_error({FATAL: message})) == message and fatal_error(None) is None
