"""`prep verify`: check a dataset's shards against its manifest and sample table (presence, size, sha256, sample count; `--full` decodes every sample)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from typing import Any

import fsspec

from data_prep import format as fmt

_READ_BLOCK = 8 << 20


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def _sample_offsets(fs: fsspec.AbstractFileSystem, path: str) -> list[int]:
    """Header offset of each sample (first member of each run of same-key members), as webdataset groups them."""
    offsets, last_key = [], None
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            key = info.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if key != last_key:
                offsets.append(info.offset)
                last_key = key
    return offsets


def _check_sample(shard: str, row: dict[str, Any], members: dict[str, bytes], image_format: str) -> str | None:
    from PIL import Image

    where = f"{shard}: sample {row['key']} (index {row['index']})"
    if set(members) != {image_format, fmt.TEXT_SUFFIX, fmt.META_SUFFIX}:
        return f"{where}: members {sorted(members)}, expected {image_format}/txt/json"
    try:
        members[fmt.TEXT_SUFFIX].decode("utf-8")
        meta = json.loads(members[fmt.META_SUFFIX])
        with Image.open(io.BytesIO(members[image_format])) as im:
            im.load()
            size, mode = im.size, im.mode
    except Exception as e:  # any decode failure is a finding, not a crash
        return f"{where}: does not decode: {type(e).__name__}: {e}"
    if size != (row["width"], row["height"]) or fmt.bucket_str(*size) != row["bucket"] or mode != "RGB":
        return f"{where}: image is {size[0]}x{size[1]} {mode}, table says {row['bucket']} RGB"
    if (meta.get("width"), meta.get("height"), meta.get("bucket")) != (row["width"], row["height"], row["bucket"]):
        return f"{where}: json member disagrees with the sample table"
    return None


def verify_dataset(data_dir: str, *, full: bool = False, show_progress: bool = True) -> tuple[list[str], str]:
    """Return (problems, summary); each problem names the shard (or file) it concerns."""
    from tqdm import tqdm

    try:
        manifest = fmt.load_manifest(data_dir)
        table = fmt.load_sample_table(data_dir)
    except (fmt.FormatError, OSError) as e:
        return [str(e)], "verify: dataset unreadable"
    problems: list[str] = []
    rows_by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        rows_by_shard[row["shard"]].append(row)
    listed = {s["name"] for s in manifest["shards"]}
    for name in sorted(set(rows_by_shard) - listed):
        problems.append(f"{name}: in {fmt.SAMPLES_NAME} but not in {fmt.INDEX_NAME}")
    image_format = manifest.get("builder", {}).get("format", "png")

    fs, root = fsspec.core.url_to_fs(data_dir)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="verify", disable=not show_progress)
    for shard in manifest["shards"]:
        name = shard["name"]
        path = fs._strip_protocol(fmt.join(data_dir, name))
        rows = rows_by_shard.get(name, [])
        bar.update(shard["bytes"])
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        size = fs.size(path)
        if size != shard["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
            continue
        digest = _hash_file(fs, path)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 mismatch (manifest {shard['sha256'][:12]}…, file {digest[:12]}…)")
            continue
        if len(rows) != shard["num_samples"]:
            problems.append(f"{name}: {len(rows)} rows in {fmt.SAMPLES_NAME}, manifest says {shard['num_samples']}")
            continue
        try:
            offsets = _sample_offsets(fs, path)
        except tarfile.TarError as e:
            problems.append(f"{name}: not a readable tar: {e}")
            continue
        if offsets != [r["offset"] for r in rows]:
            problems.append(f"{name}: {len(offsets)} samples in the tar, offsets disagree with {fmt.SAMPLES_NAME}")
            continue
        if full:
            with fs.open(path, "rb") as f:
                for row in rows:
                    f.seek(row["offset"])
                    problem = _check_sample(name, row, fmt.parse_sample(f.read(row["size"])), image_format)
                    if problem:
                        problems.append(problem)
    bar.close()
    what = "decoded every sample of" if full else "checked"
    summary = f"verify: {what} {len(manifest['shards'])} shards, {manifest['num_samples']} samples: "
    summary += f"{len(problems)} problem(s)" if problems else "OK"
    return problems, summary
