"""Storage probe before step 0: every rank must see the run directory and the dataset index that rank 0 sees.

With `run.storage` or `data.path` on a path that is not shared (a node-local disk), each node's ranks see different
checkpoints and data: on a restart node 0 resumes at step N while the others start at 0 and the collectives diverge
(hang or nonsense). So rank 0 writes a nonce file into the run directory, every rank reads it back through fsspec
(local paths and object stores alike) and every rank hashes the dataset manifest; one all-gather compares them. A
failure is fatal, not transient: the workers return it (Ray Train restarts only a raising worker group, and a retry
could not fix the storage) and the driver reports it as `StorageProbeError`.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from data_prep.format import INDEX_NAME, join, load_manifest, manifest_hash
from orchestration import checkpoint as ckpt

FATAL = "fatal_storage_probe"  # key of the training function's return value that carries a probe failure
PROBE_PREFIX = ".storage-probe-"

Gather = Callable[[Any], list[Any]]  # all_gather_object: every rank's value, in rank order


class StorageProbeError(RuntimeError):
    """The ranks do not see the same run directory or dataset (the message names the nodes and the paths)."""


@dataclass(frozen=True)
class View:
    """What one rank sees: `run_dir` is None when it read rank 0's nonce, else why not; `manifest` the dataset
    manifest's hash, or why it could not be read (prefixed `!`)."""

    rank: int
    node: str
    run_dir: str | None
    manifest: str


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _read_nonce(path: str, nonce: str) -> str | None:
    try:
        fs, p = fsspec.core.url_to_fs(path)
        fs.invalidate_cache()  # an object store client may answer from a listing taken before the write
        got = fs.cat_file(p).decode()
    except FileNotFoundError:
        return "no such file"
    except Exception as exc:  # noqa: BLE001  (fsspec backends raise many classes; all mean "not seen")
        return _why(exc)
    return None if got == nonce else "it holds another nonce"


def _manifest(data_dir: str) -> str:
    try:
        return manifest_hash(load_manifest(data_dir))
    except Exception as exc:  # noqa: BLE001
        return f"!{_why(exc)}"


def probe_storage(run_dir: str, data_dir: str, rank: int, node: str, gather: Gather) -> str | None:
    """Collective: None when every rank sees rank 0's run directory and dataset manifest, else one message (the
    same on every rank) naming the nodes that differ and the paths."""
    nonce, write_error = secrets.token_hex(16), None
    if rank == 0:
        try:
            fs, p = fsspec.core.url_to_fs(run_dir)
            fs.makedirs(p, exist_ok=True)
            ckpt.write_bytes(f"{run_dir.rstrip('/')}/{PROBE_PREFIX}{nonce}", nonce.encode(),
                             ckpt.RetryPolicy(attempts=2, backoff_s=0.5))
        except Exception as exc:  # noqa: BLE001
            write_error = _why(exc)
    nonce, write_error = gather((nonce, write_error))[0]
    probe = f"{run_dir.rstrip('/')}/{PROBE_PREFIX}{nonce}"
    if write_error is not None:
        seen: str | None = f"rank 0 could not write it ({write_error})"
    else:
        seen = _read_nonce(probe, nonce)
    views = [View(*v) for v in gather((rank, node, seen, _manifest(data_dir)))]
    if rank == 0 and write_error is None:
        try:
            fs, p = fsspec.core.url_to_fs(probe)
            fs.rm(p)
        except Exception:  # noqa: BLE001  (a leftover probe file is harmless)
            pass
    return describe_mismatch(views, probe, join(data_dir, INDEX_NAME))


def _by_node(views: list[View]) -> str:
    """`rank 2,3 on node B and rank 5 on node C`: ranks grouped by node."""
    nodes: dict[str, list[int]] = {}
    for v in views:
        nodes.setdefault(v.node, []).append(v.rank)
    return " and ".join(f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))} on node {n}"
                        for n, r in nodes.items())


def _manifest_text(value: str) -> str:
    return f"unreadable ({value[1:]})" if value.startswith("!") else f"manifest {value[:12]}"


def describe_mismatch(views: list[View], probe: str, index: str) -> str | None:
    """One message naming, grouped by node, every rank whose view differs from rank 0's; None when all agree."""
    first = views[0]
    problems = []
    unseen = [v for v in views if v.run_dir is not None]
    if unseen:
        problems.append(f"run directory: {_by_node(unseen)} cannot see the probe file {probe} that rank 0 on node "
                        f"{first.node} wrote ({unseen[0].run_dir})")
    manifests: dict[str, list[View]] = {}
    for v in views:
        manifests.setdefault(v.manifest, []).append(v)
    if len(manifests) > 1 or first.manifest.startswith("!"):
        seen = "; ".join(f"{_by_node(group)}: {_manifest_text(value)}" for value, group in manifests.items())
        problems.append(f"dataset index {index} differs between ranks: {seen}")
    if not problems:
        return None
    return ("storage probe failed before step 0: " + "; ".join(problems) + ". run.storage and data.path must be "
            "storage every node shares (a network filesystem mounted at the same path, or an object store URL)")


def fatal_error(return_value: Any) -> StorageProbeError | None:
    """The driver's side: the error a training function's return value carries, if any."""
    if isinstance(return_value, dict) and return_value.get(FATAL):
        return StorageProbeError(return_value[FATAL])
    return None
