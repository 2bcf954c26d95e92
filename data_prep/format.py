"""The shard format contract: file names, manifest and per-sample table schema, deterministic tar writing, readers.

Layout of a dataset directory (local path or fsspec URL) written by `asymflow prep shards`::

    DATA/index.json          manifest: {"version": 1, "num_samples", "builder": {...}, "shards": [...],
                             "totals": {...}, "buckets": {"WxH": count}}
    DATA/samples.parquet     one row per sample, in (shard order, position) order; columns SAMPLE_SCHEMA
    DATA/skipped.jsonl       one {"source", "reason"[, "detail"]} per skipped input
    DATA/shard-000000.tar    WebDataset tars; each sample = `{key}.{png|jpg|webp}`, `{key}.txt`, `{key}.json`

A sample's members are consecutive in its tar; `offset` is the byte offset of its first member header and
`size` runs through the end of its last member's padding, so `read_sample_bytes` fetches one sample with a
single byte-range read (no tar scan) and parses it with `tarfile` on a BytesIO. Tar headers carry fixed
metadata (mtime 0, uid/gid 0, empty owner names, mode 0644, ustar) so identical samples give identical bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SAMPLES_NAME = "samples.parquet"
SKIPPED_NAME = "skipped.jsonl"
WIDS_INDEX_NAME = "wids-index.json"  # webdataset's indexed-reader format: wids.ShardListDataset(DATA/wids-index.json)

IMAGE_FORMATS = ("png", "jpg", "webp")  # stored image member suffixes
TEXT_SUFFIX = "txt"
META_SUFFIX = "json"

# Reasons written to skipped.jsonl; short snake_case so users can grep/count them.
SKIP_REASONS = (
    "unreadable",  # path missing / permission / I/O error
    "zero_byte",
    "duplicate",  # same source bytes (sha256) as an earlier input in enumeration order
    "bad_caption_encoding",  # caption bytes are not valid UTF-8
    "not_an_image",  # no decoder recognises the bytes (or a tar sample without an image member)
    "decompression_bomb",  # header claims more pixels than --max-pixels
    "truncated",  # image data ends early
    "corrupt",  # the decoder rejects the image data for another reason
    "too_small",  # below --min-side, or would need upscaling without --upscale
    "unsupported",  # a decodable image we cannot convert to RGB (exotic mode)
    "bad_row",  # a table row that names no image (invalid JSON line, empty path cell)
    "error",  # an unexpected exception while processing this input (a bug: please report the detail)
)

# Keys are the input's position in the sorted input enumeration, so they are stable across reruns and
# independent of the worker count; 9 digits cover 10^9 inputs and sort lexicographically.
KEY_DIGITS = 9

SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # shard file name, relative to DATA
        ("index", pa.int32()),  # position of the sample inside its shard
        ("bucket", pa.string()),  # "WxH" of the stored image
        ("width", pa.int32()),  # stored image
        ("height", pa.int32()),
        ("original_width", pa.int32()),  # source image after EXIF orientation
        ("original_height", pa.int32()),
        ("offset", pa.int64()),  # byte offset of the sample's first member header in the tar
        ("size", pa.int64()),  # bytes from offset through the end of the sample's last member (incl. padding)
    ]
)

_BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+\.tar$")


class FormatError(ValueError):
    """A dataset directory does not follow this format (bad manifest, missing file, schema mismatch)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(input_index: int) -> str:
    return f"{input_index:0{KEY_DIGITS}d}"


def bucket_str(width: int, height: int) -> str:
    return f"{int(width)}x{int(height)}"


def parse_bucket(bucket: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    m = _BUCKET_RE.match(bucket)
    if not m:
        raise FormatError(f"bad bucket {bucket!r}: expected 'WxH', e.g. '1024x1024'")
    return int(m.group(1)), int(m.group(2))


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes hashed by `manifest_hash`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of {version, shards}: identifies the data a run or artifact came from.

    Only version + shard list (names, counts, bytes, sha256) enter, so builder-config cosmetics that do not
    change the bytes on disk do not change the hash.
    """
    return hashlib.sha256(canonical_json({"version": manifest["version"], "shards": manifest["shards"]})).hexdigest()


def join(data_dir: str, name: str) -> str:
    """Path of `name` inside `data_dir` for local paths and fsspec URLs alike."""
    if "://" in data_dir:
        return data_dir.rstrip("/") + "/" + name
    return os.path.join(data_dir, name)


def wids_index(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The dataset as a wids shard index (`wids_version` 1): shard URLs relative to the index file, sample counts
    and sizes from the manifest; deterministic, so a rebuilt dataset writes the same bytes."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [{"url": s["name"], "nsamples": s["num_samples"], "filesize": s["bytes"]}
                      for s in manifest["shards"] if s["num_samples"] > 0],
    }


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check the manifest's structure and internal consistency; raise FormatError naming the problem."""
    if not isinstance(manifest, dict):
        raise FormatError("manifest is not a JSON object")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported manifest version {version!r} (this code reads version {FORMAT_VERSION})")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise FormatError("manifest has no 'shards' list")
    seen: set[str] = set()
    total = 0
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise FormatError(f"shards[{i}] is not an object")
        for field, kind in (("name", str), ("num_samples", int), ("bytes", int), ("sha256", str)):
            if not isinstance(shard.get(field), kind):
                raise FormatError(f"shards[{i}].{field} missing or not {kind.__name__}")
        name = shard["name"]
        # Names become paths next to index.json: refuse anything that could escape the directory.
        if not _SHARD_NAME_RE.match(name) or name in seen:
            raise FormatError(f"shards[{i}].name {name!r} is not a unique plain '*.tar' file name")
        if shard["num_samples"] < 0 or shard["bytes"] < 0 or len(shard["sha256"]) != 64:
            raise FormatError(f"shards[{i}] ({name}) has a negative count/size or a malformed sha256")
        seen.add(name)
        total += shard["num_samples"]
    if manifest.get("num_samples") != total:
        raise FormatError(f"num_samples={manifest.get('num_samples')!r} but the shards hold {total}")
    buckets = manifest.get("buckets", {})
    if not isinstance(buckets, dict) or sum(buckets.values()) != total:
        raise FormatError("'buckets' counts do not add up to num_samples")
    for b in buckets:
        parse_bucket(b)
    return manifest


def load_manifest(data_dir: str) -> dict[str, Any]:
    """Read and validate DATA/index.json (local or fsspec URL)."""
    path = join(data_dir, INDEX_NAME)
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FormatError(f"{data_dir}: not a dataset ({INDEX_NAME} not found; datasets are written by "
                          "`asymflow prep shards`)") from e
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    return validate_manifest(manifest)


def read_parquet(f: BinaryIO) -> pa.Table:
    """The whole table of an open (fsspec or local) parquet file.

    Arrow is never given a Python object to read from: its pool threads can drop their last reference to one (the
    file wrapper, or a buffer of bytes read from it) after the interpreter has begun to exit; the destructor then asks
    for the GIL, Python ends that thread, and the process dies with "terminate called without an active exception".
    Seen three ways: `pq.read_table(f)`'s dataset scanner, threaded column decoding and the IO pool's `ReadAsync`
    (`prep cache` inside a Ray job; commands that exit right after `DatasetIndex.open`). So the bytes are copied into
    a buffer Arrow allocated and owns (one more copy of a table that is read whole anyway).
    """
    import pyarrow.parquet as pq

    data = f.read()
    owned = pa.allocate_buffer(len(data))
    memoryview(owned).cast("B")[:] = data
    return pq.ParquetFile(pa.BufferReader(owned)).read()


def load_sample_table(data_dir: str) -> pa.Table:
    """Read DATA/samples.parquet and check its columns against SAMPLE_SCHEMA (extra columns are allowed)."""
    path = join(data_dir, SAMPLES_NAME)
    with fsspec.open(path, "rb") as f:
        table = read_parquet(f)
    for field in SAMPLE_SCHEMA:
        if field.name not in table.column_names:
            raise FormatError(f"{path} lacks column {field.name!r}")
        if not table.schema.field(field.name).type.equals(field.type):
            raise FormatError(f"{path} column {field.name!r} is {table.schema.field(field.name).type}, want {field.type}")
    return table


def parse_sample(buf: bytes) -> dict[str, bytes]:
    """Members of one sample's tar bytes (as cut by offset/size) -> {suffix: bytes}, e.g. {"png", "txt", "json"}."""
    out: dict[str, bytes] = {}
    # A slice has no end-of-archive blocks; tarfile treats the clean EOF after the last member as the end.
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            _, _, suffix = base.partition(".")
            f = tar.extractfile(info)
            assert f is not None
            out[suffix] = f.read()
    return out


def read_sample_bytes(data_dir: str, row: Mapping[str, Any], *, fs: fsspec.AbstractFileSystem | None = None) -> dict[str, bytes]:
    """Fetch one sample with one byte-range read of its shard; `row` is a samples.parquet row (needs shard, offset, size).

    Pass `fs` (e.g. from `fsspec.core.url_to_fs(data_dir)`) to reuse a filesystem across many reads.
    """
    path = join(data_dir, row["shard"])
    if fs is None:
        fs, path = fsspec.core.url_to_fs(path)
    else:
        path = fs._strip_protocol(path)
    start = int(row["offset"])
    buf = fs.cat_file(path, start=start, end=start + int(row["size"]))
    return parse_sample(buf)


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class SampleTarWriter:
    """Writes a WebDataset tar sample by sample with fixed header metadata, tracking offsets, size and sha256.

    Written by hand on top of `tarfile.TarInfo.tobuf` (instead of `tarfile.TarFile.addfile` or webdataset's
    TarWriter) because the sample table needs exact per-sample byte offsets and the rewrite path needs to copy
    already-encoded sample bytes verbatim; the byte layout is the one `tarfile` itself writes.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._sha = hashlib.sha256()
        self.offset = 0
        self.num_samples = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def write_sample(self, key: str, members: Mapping[str, bytes]) -> tuple[int, int]:
        """Append `{key}.{suffix}` for each member in order; return the sample's (offset, size)."""
        start = self.offset
        for suffix, data in members.items():
            self._write(_member_header(f"{key}.{suffix}", len(data)))
            self._write(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._write(bytes(pad))
        self.num_samples += 1
        return start, self.offset - start

    def write_raw_sample(self, buf: bytes | memoryview) -> tuple[int, int]:
        """Append a sample already laid out as tar members (a slice cut by offset/size from another shard)."""
        start = self.offset
        self._write(buf)
        self.num_samples += 1
        return start, self.offset - start

    def close(self) -> tuple[int, str]:
        """Write the end-of-archive marker and record padding as `tarfile` does; return (total bytes, sha256 hex)."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        pad = -self.offset % tarfile.RECORDSIZE
        if pad:
            self._write(bytes(pad))
        return self.offset, self._sha.hexdigest()
