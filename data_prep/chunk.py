"""One chunk of `prep shards`: read, dedupe within the chunk, process and write its inputs into a temporary tar.

The unit of work both runners execute (local processes in `shards`, Ray tasks in `ray_runner`); it knows nothing
about ordering, commits or resume, which `shards` owns.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_prep import format as fmt
from data_prep.images import ImageSpec, ProcessedImage, SkipImage, process_image
from data_prep.sources import InputItem, read_caption, read_image_bytes

Progress = Callable[[int], None]


@dataclass
class ChunkTask:
    chunk: int
    first_input: int  # enumeration index of items[0]
    items: list[InputItem]
    spec: ImageSpec
    tmp_url: str  # where the worker writes its tar


@dataclass
class InputOutcome:
    digest: str | None  # sha256 of the source bytes, when they could be read and were non-empty
    reason: str | None = None  # None = written
    detail: str = ""
    row: dict[str, Any] | None = None  # samples.parquet row (shard/index filled in by the committer)


@dataclass
class ChunkResult:
    chunk: int
    tmp_url: str
    outcomes: list[InputOutcome]
    tar_bytes: int
    tar_sha256: str
    elapsed_s: float = 0.0
    image_bytes: int = field(default=0)  # encoded image payload written, for MB/s reporting
    cpu_s: float = 0.0  # CPU seconds of the building process: wall/CPU per chunk tells load from contention


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def put_atomic(url: str, data: bytes) -> None:
    """Write then rename: readers see the old file or the whole new one, never a prefix."""
    fs, path = _fs(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _sample_meta(key: str, item: InputItem, out: ProcessedImage, digest: str, extra: dict[str, Any]) -> bytes:
    meta = {
        "key": key,
        "source": item.source,
        "width": out.width,
        "height": out.height,
        "original_width": out.original_width,
        "original_height": out.original_height,
        "bucket": out.bucket,
        "crop_box": list(out.crop_box),
        "sha256": digest,
        **extra,
    }
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def build_chunk(task: ChunkTask, progress: Progress | None = None) -> ChunkResult:
    """Worker side: read, dedupe within the chunk, process and write each input of one chunk into a temp tar."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    fs, tmp_path = _fs(task.tmp_url)
    outcomes: list[InputOutcome] = []
    first_seen: dict[str, str] = {}
    image_bytes = 0
    with fs.open(tmp_path, "wb") as f:
        writer = fmt.SampleTarWriter(f)
        for i, item in enumerate(task.items):
            key = fmt.sample_key(task.first_input + i)
            outcome = InputOutcome(digest=None)
            try:
                data, members = read_image_bytes(item)
                if not data:
                    raise SkipImage("zero_byte")
                outcome.digest = hashlib.sha256(data).hexdigest()
                if outcome.digest in first_seen:  # cheap early exit; the committer applies the same rule globally
                    raise SkipImage("duplicate", f"same bytes as {first_seen[outcome.digest]}")
                first_seen[outcome.digest] = item.source
                caption, extra = read_caption(item, members)
                out = process_image(data, task.spec)
                del data, members
                offset, size = writer.write_sample(
                    key,
                    {task.spec.format: out.data, fmt.TEXT_SUFFIX: caption.encode("utf-8"), fmt.META_SUFFIX: _sample_meta(key, item, out, outcome.digest, extra)},
                )
                image_bytes += len(out.data)
                outcome.row = {
                    "key": key, "bucket": out.bucket, "width": out.width, "height": out.height,
                    "original_width": out.original_width, "original_height": out.original_height,
                    "offset": offset, "size": size,
                }
            except SkipImage as e:
                outcome.reason, outcome.detail = e.reason, e.detail
            except Exception as e:  # never let one input kill the run; the detail points at the bug
                outcome.reason = "error"
                outcome.detail = f"{type(e).__name__}: {e} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
            outcomes.append(outcome)
            if progress is not None:
                progress(1)
        tar_bytes, tar_sha = writer.close()
    return ChunkResult(task.chunk, task.tmp_url, outcomes, tar_bytes, tar_sha, time.perf_counter() - t0, image_bytes, time.process_time() - cpu0)
