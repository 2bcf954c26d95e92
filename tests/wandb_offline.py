"""Read what an offline wandb run recorded (history rows, summary), so tests can check what wandb would show.

Hand-written because wandb 0.31 ships no Python reader for its transaction log (`run-ID.wandb`, written by the
Go `wandb-core`; the old `wandb.sdk.internal.datastore` is gone) and offline runs write no `wandb-summary.json`.
The format is small and stable: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then LevelDB-log-style
32 KiB blocks of chunks `crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last) | data`;
joined chunks are `wandb.proto` `Record` messages.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every `Record` in one `.wandb` file, in write order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    out, parts, pos = [], [], HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict[str, Any]]:
    """Logged rows (`run.log`), each a dict with `_step` and the logged values."""
    return [{_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def summary(path: Path) -> dict[str, Any]:
    """The run summary as the file leaves it (later updates win)."""
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                out[_key(u)] = json.loads(u.value_json)
    return out


def run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The transaction logs of every attempt of `run_id` under a wandb directory, oldest first (one offline-run
    directory per process that resumed the run; their names start with the start time)."""
    return sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
