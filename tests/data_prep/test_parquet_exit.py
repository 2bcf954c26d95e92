"""Reading parquet through an fsspec file must not crash the process at exit (seen in `prep cache` inside a Ray job,
and after `DatasetIndex.open`).

Arrow's pool threads outlived the read and released a Python-owned object (the file wrapper, or a buffer of bytes
read from it) after the interpreter had begun to exit — "terminate called without an active exception", exit 134 —
in three ways, each found from a core dump: `pq.read_table(file_object)`'s dataset scanner (about 1 run in 4 of a
3-read script), `ParquetFile(f).read()`'s threaded column decoding (about 1 in 15 of the script below) and, with
`use_threads=False`, the IO pool's `ReadAsync` (2 of these 48 runs). Forty-eight clean runs in a row, two at a time
as here, happen with probability ≤ (14/15)⁴⁸ ≈ 4 % for the second and ≈ 13 % for the third if they came back.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
RUNS = 48
SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch  # noqa: F401  (a longer interpreter exit, as in our commands)
import fsspec
from data_prep.format import read_parquet
for path in {paths!r}:
    with fsspec.open(path, "rb") as f:
        table = read_parquet(f)
    assert table.num_rows == 12
"""


def test_reading_parquet_from_a_file_object_exits_cleanly(tmp_path):
    rows = range(12)
    samples = pa.table({"key": [f"k{i}" for i in rows], "shard": ["s"] * 12, "index": pa.array(rows, pa.int32()),
                        "bucket": ["64x64"] * 12, **{c: pa.array(rows, pa.int32()) for c in ("w", "h", "ow", "oh")},
                        "offset": pa.array(rows, pa.int64()), "size": pa.array(rows, pa.int64())})
    cache = pa.table({"key": [f"k{i}" for i in rows], "shard": ["c"] * 12,
                      **{c: pa.array(rows, pa.int64()) for c in ("offset", "size", "latent_size")}})
    paths = [str(tmp_path / "samples.parquet"), str(tmp_path / "cache.parquet")]
    pq.write_table(samples, paths[0])
    pq.write_table(cache, paths[1])
    script = SCRIPT.format(repo=str(REPO), paths=paths)

    def run(_: int) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr[-300:]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(RUNS)))
    failed = [(rc, err) for rc, err in results if rc != 0]
    assert not failed, f"{len(failed)} of {RUNS} runs failed, e.g. exit {failed[0][0]}: {failed[0][1]}"
