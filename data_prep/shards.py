"""`prep shards`: plan shards from the input enumeration, build them in parallel workers, commit them in order, resumably.

Determinism, whatever the worker count or runner (local processes or Ray):
- the enumeration is ordered (sources.py); input i gets key `sample_key(i)`;
- chunk j = inputs [j·K, (j+1)·K) becomes `shard_name(j)`; skipped inputs only make a shard smaller, and a
  chunk whose inputs are all skipped writes no shard (names may then have gaps; the manifest lists them);
- workers build a chunk into a temporary tar; the driver commits chunks strictly in chunk order, which is
  where exact duplicates are decided globally: an input whose source bytes (sha256) equal those of any
  earlier input is skipped as `duplicate`. Duplicates across chunks are rare, so the worker keeps them and
  the committer drops them by copying the other samples' bytes verbatim into a new tar (same bytes as if
  they had never been written).
Resumability: a chunk is done once its tar has been renamed into place *and* then its done record
`_build/done/shard-XXXXXX.json` (manifest entry, sample rows, skips, input digests) has been atomically
written. A rerun skips done chunks, rebuilds the rest, and writes index.json / samples.parquet /
skipped.jsonl from the done records — byte-identical to an uninterrupted run. index.json is written last
and marks completion; rerunning on a complete output is a no-op.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from data_prep import format as fmt
from data_prep.chunk import ChunkResult, ChunkTask, InputOutcome, Progress, build_chunk, put_atomic
from data_prep.images import ImageSpec
from data_prep.sources import InputItem, enumerate_inputs

BUILD_DIR = "_build"  # resume state, removed once index.json is written
EXIT_OK, EXIT_NOTHING_WRITTEN, EXIT_FATAL, EXIT_STRICT = 0, 1, 2, 3


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the output bytes (worker count and runner deliberately excluded)."""

    input: str
    output: str
    image: ImageSpec
    shard_size: int = 1000
    path_column: str | None = None
    caption_column: str | None = None

    def builder_record(self, inputs_sha256: str, num_inputs: int) -> dict[str, Any]:
        """The manifest's `builder` section; also the resume guard (a rerun must match it)."""
        import zlib

        import PIL

        spec = asdict(self.image)
        spec["buckets"] = [fmt.bucket_str(w, h) for w, h in self.image.buckets]
        return {
            "tool": "asymflow prep shards",
            "input": self.input,
            "path_column": self.path_column,
            "caption_column": self.caption_column,
            "shard_size": self.shard_size,
            **spec,
            "num_inputs": num_inputs,
            "inputs_sha256": inputs_sha256,
            "pillow": PIL.__version__,  # resampling/encoders can change bytes between Pillow releases
            "zlib": zlib.ZLIB_RUNTIME_VERSION,  # deflates the PNG writer's output (images.png_average_rgb8)
        }


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


# --------------------------------------------------------------------------------------------------------------
# Local runner: a process pool with a bounded window of chunks in flight, results in chunk order.

_worker_progress = None  # per worker process: the shared counter set by the pool initializer


def _worker_init(counter: Any) -> None:
    global _worker_progress
    _worker_progress = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the driver
    if sys.platform.startswith("linux"):
        # Die with our parent: a SIGKILLed build must not leave workers writing into the output.
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _count_progress(n: int) -> None:
    with _worker_progress.get_lock():
        _worker_progress.value += n


def _pool_build_chunk(task: ChunkTask) -> ChunkResult:
    return build_chunk(task, _count_progress)


def run_local(tasks: list[ChunkTask], workers: int, progress: Progress) -> Iterator[ChunkResult]:
    """Build chunks in `workers` processes (in-process for 1), yielding results in task order."""
    if workers <= 1:
        for task in tasks:
            yield build_chunk(task, progress)
        return
    import multiprocessing as mp

    # forkserver: workers do not inherit the driver's threads (tqdm monitor) or an imported torch.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.shards"])  # workers fork with PIL/numpy/fsspec already imported
    counter = ctx.Value("q", 0)
    shown = 0
    with ctx.Pool(workers, initializer=_worker_init, initargs=(counter,)) as pool:
        pending: deque = deque()
        todo = iter(tasks)
        window = 2 * workers  # bounds memory and temporary tars while a slow chunk holds up in-order commits
        while True:
            while len(pending) < window and (task := next(todo, None)) is not None:
                pending.append(pool.apply_async(_pool_build_chunk, (task,)))
            if not pending:
                return
            head = pending[0]
            while not head.ready():
                head.wait(0.2)
                if counter.value > shown:
                    progress(counter.value - shown)
                    shown = counter.value
            pending.popleft()
            yield head.get()


# --------------------------------------------------------------------------------------------------------------
# Driver: plan, resume, commit, finalize.


def default_workers() -> int:
    """All cores this process may run on (respects CPU affinity / container cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def inputs_fingerprint(items: list[InputItem]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(fmt.canonical_json([item.source, item.byte_range, item.caption if isinstance(item.caption, str) else None, item.error]))
    return h.hexdigest()


@dataclass
class BuildReport:
    exit_code: int
    message: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    num_inputs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    built_inputs: int = 0  # inputs processed in this run (not resumed from done records)
    image_bytes: int = 0
    worker_cpu_s: float = 0.0  # CPU seconds spent building chunks, summed over workers (bench/shard_build.py)


class _Committer:
    """Commits chunk results in chunk order: global dedupe, optional rewrite, rename into place, done record."""

    def __init__(self, cfg: BuildConfig, strict: bool) -> None:
        self.cfg = cfg
        self.strict = strict
        self.seen: set[str] = set()
        self.fs, self.out = _fs(cfg.output)

    def done_url(self, chunk: int) -> str:
        return fmt.join(self.cfg.output, f"{BUILD_DIR}/done/{fmt.shard_name(chunk)}.json")

    def replay(self, record: dict[str, Any]) -> None:
        self.seen.update(d for d in record["digests"] if d is not None)

    def commit(self, task: ChunkTask, result: ChunkResult) -> dict[str, Any]:
        name = fmt.shard_name(task.chunk)
        skipped, digests = [], []
        kept: list[InputOutcome] = []
        for item, outcome in zip(task.items, result.outcomes):
            digests.append(outcome.digest)
            if outcome.digest is not None:
                if outcome.digest in self.seen and outcome.reason != "duplicate":
                    outcome.reason, outcome.detail = "duplicate", "same bytes as an input in an earlier shard"
                self.seen.add(outcome.digest)
            if outcome.reason is None:
                kept.append(outcome)
            else:
                skipped.append({"source": item.source, "reason": outcome.reason, "detail": outcome.detail})
        if self.strict and skipped:
            raise StrictSkip(skipped[0])
        tmp_path = self.fs._strip_protocol(result.tmp_url)
        written = [o for o in result.outcomes if o.row is not None]
        entry = None
        if kept:
            nbytes, sha = result.tar_bytes, result.tar_sha256
            if len(kept) != len(written):
                nbytes, sha = self._rewrite_without(tmp_path, kept)
            self.fs.mv(tmp_path, self.fs._strip_protocol(fmt.join(self.cfg.output, name)))
            entry = {"name": name, "num_samples": len(kept), "bytes": nbytes, "sha256": sha}
        else:
            self.fs.rm(tmp_path)
        rows = [{"shard": name, "index": i, **o.row} for i, o in enumerate(kept)]
        data = fmt.canonical_json({"chunk": task.chunk, "entry": entry, "rows": rows, "skipped": skipped, "digests": digests})
        put_atomic(self.done_url(task.chunk), data)
        # Finalize from the record as a resumed run would read it back, so both produce the same bytes.
        return json.loads(data)

    def _rewrite_without(self, tmp_path: str, kept: list[InputOutcome]) -> tuple[int, str]:
        """Copy the kept samples' bytes verbatim into a new tar (offsets shift; bytes are as if never written)."""
        fs = self.fs
        src = fs.cat_file(tmp_path)
        new_path = tmp_path + ".dedup"
        with fs.open(new_path, "wb") as f:
            writer = fmt.SampleTarWriter(f)
            for o in kept:
                start, size = o.row["offset"], o.row["size"]
                o.row["offset"], _ = writer.write_raw_sample(memoryview(src)[start : start + size])
            nbytes, sha = writer.close()
        fs.mv(new_path, tmp_path)
        return nbytes, sha


class StrictSkip(Exception):
    def __init__(self, skip: dict[str, Any]) -> None:
        super().__init__(f"--strict: {skip['source']}: {skip['reason']} {skip['detail']}".rstrip())


def _read_json(url: str) -> Any:
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def _finalize(cfg: BuildConfig, builder: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write samples.parquet, skipped.jsonl, wids-index.json, then index.json (the completion marker) from the done
    records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = [r["entry"] for r in records if r["entry"] is not None]
    rows = [row for r in records for row in r["rows"]]
    skipped = [s for r in records for s in r["skipped"]]
    table = pa.Table.from_pylist(rows, schema=fmt.SAMPLE_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1 << 20)
    put_atomic(fmt.join(cfg.output, fmt.SAMPLES_NAME), buf.getvalue())
    put_atomic(fmt.join(cfg.output, fmt.SKIPPED_NAME), b"".join(json.dumps(s, ensure_ascii=False).encode() + b"\n" for s in skipped))
    reasons = Counter(s["reason"] for s in skipped)
    buckets = Counter(row["bucket"] for row in rows)
    manifest = {
        "version": fmt.FORMAT_VERSION,
        "num_samples": len(rows),
        "builder": builder,
        "shards": shards,
        "totals": {
            "inputs": builder["num_inputs"],
            "written": len(rows),
            "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "buckets": {b: buckets[b] for b in sorted(buckets, key=fmt.parse_bucket)},
    }
    fmt.validate_manifest(manifest)
    wids = fmt.wids_index(manifest, f"asymflow-{fmt.manifest_hash(manifest)[:16]}")  # named by content, not place
    put_atomic(fmt.join(cfg.output, fmt.WIDS_INDEX_NAME), json.dumps(wids, indent=1).encode())
    put_atomic(fmt.join(cfg.output, fmt.INDEX_NAME), json.dumps(manifest, indent=1, ensure_ascii=False).encode() + b"\n")
    return manifest


def _summary(manifest: dict[str, Any], output: str) -> str:
    t = manifest["totals"]
    where = f" (each listed in {fmt.join(output, fmt.SKIPPED_NAME)})" if t["skipped"] else ""
    lines = [f"wrote {t['written']} samples in {len(manifest['shards'])} shards ({t['bytes'] / 1e6:.1f} MB); skipped {t['skipped']} of {t['inputs']} inputs{where}"]
    lines += [f"  {reason}: {n}" for reason, n in t["skipped_by_reason"].items()]
    return "\n".join(lines)


def build_shards(
    cfg: BuildConfig,
    *,
    workers: int | None = None,
    strict: bool = False,
    ray_address: str | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Build (or resume, or confirm) the dataset at cfg.output; never raises for bad inputs, returns an exit code."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    index_url = fmt.join(cfg.output, fmt.INDEX_NAME)
    build_url = fmt.join(cfg.output, BUILD_DIR)
    out_fs, out_path = _fs(cfg.output)

    items = enumerate_inputs(cfg.input, path_column=cfg.path_column, caption_column=cfg.caption_column)
    builder = cfg.builder_record(inputs_fingerprint(items), len(items))
    if not items:
        return BuildReport(EXIT_NOTHING_WRITTEN, f"no inputs found in {cfg.input}")

    if out_fs.exists(out_fs._strip_protocol(index_url)):
        manifest = fmt.load_manifest(cfg.output)
        if manifest["builder"] != builder:
            return BuildReport(EXIT_FATAL, f"{cfg.output} already holds a dataset built from other inputs or settings; use a new OUTPUT")
        if out_fs.exists(out_fs._strip_protocol(build_url)):
            out_fs.rm(out_fs._strip_protocol(build_url), recursive=True)
        t = manifest["totals"]
        return BuildReport(EXIT_OK, "already complete, nothing to do\n" + _summary(manifest, cfg.output), t["written"], Counter(t["skipped_by_reason"]), t["inputs"], t["bytes"])

    config_url = fmt.join(build_url, "config.json")
    out_fs.makedirs(out_fs._strip_protocol(fmt.join(build_url, "done")), exist_ok=True)
    if out_fs.exists(out_fs._strip_protocol(config_url)):
        if _read_json(config_url) != builder:
            return BuildReport(EXIT_FATAL, f"{cfg.output} holds a partial build with other inputs or settings; rerun with the same ones or use a new OUTPUT")
    else:
        put_atomic(config_url, fmt.canonical_json(builder))
    tmp_dir = fmt.join(build_url, "tmp")
    if out_fs.exists(out_fs._strip_protocol(tmp_dir)):
        out_fs.rm(out_fs._strip_protocol(tmp_dir), recursive=True)  # leftovers of a killed run
    out_fs.makedirs(out_fs._strip_protocol(tmp_dir), exist_ok=True)

    committer = _Committer(cfg, strict)
    k = cfg.shard_size
    num_chunks = -(-len(items) // k)
    done = {c for c in range(num_chunks) if out_fs.exists(out_fs._strip_protocol(committer.done_url(c)))}
    tasks = [
        ChunkTask(c, c * k, items[c * k : (c + 1) * k], cfg.image, fmt.join(tmp_dir, f"{fmt.shard_name(c)}.{uuid.uuid4().hex}"))
        for c in range(num_chunks)
        if c not in done
    ]
    todo_inputs = sum(len(t.items) for t in tasks)
    if done:
        log(f"resuming: {len(done)} of {num_chunks} shards already done")

    workers = workers or default_workers()
    bar = tqdm(total=todo_inputs, unit="img", desc="prep shards", disable=not show_progress, dynamic_ncols=True, smoothing=0.1)
    if ray_address is not None:
        from data_prep.ray_runner import run_ray

        results = run_ray(tasks, ray_address, bar.update)
    else:
        results = run_local(tasks, workers, bar.update)

    report = BuildReport(EXIT_OK, "", num_inputs=len(items), built_inputs=todo_inputs)
    records: list[dict[str, Any]] = []
    task_iter = iter(tasks)
    try:
        for c in range(num_chunks):
            if c in done:
                record = _read_json(committer.done_url(c))
                committer.replay(record)
            else:
                task = next(task_iter)
                result = next(results)
                assert result.chunk == task.chunk
                record = committer.commit(task, result)
                report.image_bytes += result.image_bytes
                report.worker_cpu_s += result.cpu_s
                # chunks, not shards: a chunk whose inputs are all skipped writes no shard
                bar.set_postfix(chunks=f"{c + 1}/{num_chunks}", refresh=False)
            records.append(record)
    except StrictSkip as e:
        bar.close()
        return BuildReport(EXIT_STRICT, str(e), num_inputs=len(items))
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        bar.close()

    manifest = _finalize(cfg, builder, records)
    out_fs.rm(out_fs._strip_protocol(build_url), recursive=True)
    t = manifest["totals"]
    report.written, report.skipped, report.bytes = t["written"], Counter(t["skipped_by_reason"]), t["bytes"]
    report.seconds = time.perf_counter() - t0
    report.message = _summary(manifest, cfg.output)
    if report.written == 0:
        report.exit_code = EXIT_NOTHING_WRITTEN
        report.message += "\nnothing usable was produced"
    return report
