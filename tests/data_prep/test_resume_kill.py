"""SIGKILL a real `asymflow prep shards` process partway, rerun it, and get output byte-identical to an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_prep.corpus import build_large_corpus, build_messy_corpus
from data_prep.shards import BUILD_DIR

REPO = Path(__file__).resolve().parents[2]


def prep_shards(inp: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "prep", "shards", str(inp), str(out),
            "--resolution", "256", "--shard-size", "2", "--workers", str(workers), "--no-progress"]


def read_dir(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sigkill_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    build_messy_corpus(inp)  # skips and a duplicate in a late shard: resume must replay earlier digests
    build_large_corpus(inp / "m_large", count=16, long_side=1200)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    reference = subprocess.run(prep_shards(inp, tmp_path / "ref", 1), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    done_dir = out / BUILD_DIR / "done"
    proc = subprocess.Popen(prep_shards(inp, out, 2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed; make the corpus larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists()
    done_before = len(list(done_dir.glob("*.json")))

    resumed = subprocess.run(prep_shards(inp, out, 2), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done_before} of" in resumed.stdout + resumed.stderr
    assert read_dir(out) == read_dir(tmp_path / "ref")

    again = subprocess.run(prep_shards(inp, out, 1), env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout
