"""Reading parquet through an fsspec file must not crash the process at exit (seen in `prep cache` inside a Ray job).

`pq.read_table(file_object)` leaves the file wrapper to an Arrow pool thread, which can release it after the
interpreter has started to exit: "terminate called without an active exception", exit 134, in about a quarter of
the runs of the script below. Thirty clean runs in a row would happen with probability 0.75³⁰ ≈ 2e-4 if it came back.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
RUNS = 30
SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import fsspec
from data_prep.format import read_parquet
for _ in range(3):
    with fsspec.open({path!r}, "rb") as f:
        table = read_parquet(f)
assert table.num_rows == 1000
"""


def test_reading_parquet_from_a_file_object_exits_cleanly(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(1000)], "x": list(range(1000))}), path)
    script = SCRIPT.format(repo=str(REPO), path=str(path))

    def run(_: int) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr[-300:]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(RUNS)))
    failed = [(rc, err) for rc, err in results if rc != 0]
    assert not failed, f"{len(failed)} of {RUNS} runs failed, e.g. exit {failed[0][0]}: {failed[0][1]}"
