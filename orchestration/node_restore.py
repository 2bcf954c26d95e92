"""Resume from object storage with one download per node: the node's first rank fetches what its ranks read.

Without this every rank downloaded the whole checkpoint (8 copies per 8-GPU node: ~200 GB of local disk and ~800 GB
of egress per resume at 9B). Now the lowest rank of each node fetches into the node's cache directory (keyed by the
checkpoint's state.json, see `checkpoint.restore_cache_dir`) only the shared files and its node's ranks' ZeRO shard
files — or every engine file when the world size changed, since DeepSpeed's universal conversion reads them all —
while the node's other ranks wait in the collective that also tells every rank whether each node's fetch worked.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from orchestration import checkpoint as ckpt

_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files: [bf16_]zero_pp_rank_R_mp_rank_*

Gather = Callable[[Any], list[Any]]  # all_gather_object: every rank's value, in rank order


def files_for_ranks(ranks: Collection[int] | None) -> Callable[[str], bool]:
    """Selector of the checkpoint files (relative names) that ranks `ranks` read on resume: state.json and the EMA
    (every rank), and under the engine directory the files of these ranks and those of no rank; all engine files
    when `ranks` is None. Not a consolidated trainable-weights file (older checkpoints; a resume never reads it)."""

    def wanted(name: str) -> bool:
        if name in (ckpt.STATE, ckpt.EMA, ckpt.COMPLETE):
            return True
        if not name.startswith(ckpt.ENGINE_TAG + "/"):
            return False
        match = _RANK_FILE.search(name.rsplit("/", 1)[-1])
        return ranks is None or match is None or int(match.group(1)) in ranks

    return wanted


@dataclass(frozen=True)
class NodeCopy:
    """This rank's local directory of the checkpoint, whether this rank is the one that may add derived files to it
    (DeepSpeed's universal conversion), and every node's download (for the log)."""

    path: str
    converts: bool
    downloads: list[tuple[str, int, int]]  # (node label, files, bytes) per node, in rank order of their fetchers


def node_checkpoint_copy(checkpoint: str, rank: int, node_id: str, node_label: str, every_rank: bool,
                         gather: Gather) -> NodeCopy:
    """Collective (every rank calls it): a local directory holding what this rank reads of `checkpoint`. Local
    storage: the checkpoint itself, one copy for all ranks. `every_rank`: fetch every rank's engine files (a
    world-size change). Nodes are told apart by Ray node id, not by Ray Train's local rank: that one groups workers
    by IP, so Ray nodes sharing an address (several raylets on one host) would share a single local rank 0."""
    if ckpt.is_local(checkpoint):
        return NodeCopy(ckpt._fs(checkpoint)[1], rank == 0, [])
    nodes = gather(node_id)
    mine = {r for r, n in enumerate(nodes) if n == node_id}
    outcome: tuple[str | None, int, int, str] | None = None
    if rank == min(mine):
        try:
            fetched = ckpt.fetch_checkpoint(checkpoint, files_for_ranks(None if every_rank else mine))
            outcome = (fetched.path, fetched.files, fetched.bytes, node_label)
        except Exception as exc:  # noqa: BLE001  (every rank must learn of it, or the others wait forever)
            outcome = (None, 0, 0, f"node {node_label}: {type(exc).__name__}: {exc}")
    outcomes = gather(outcome)  # the wait: nobody reads before its node's copy is complete
    failed = [o[3] for o in outcomes if o is not None and o[0] is None]
    if failed:
        raise ckpt.StorageError(f"fetching {checkpoint} failed on {len(failed)} node(s): {'; '.join(failed)}")
    path = outcomes[min(mine)][0]
    return NodeCopy(path, rank == min(mine), [(o[3], o[1], o[2]) for o in outcomes if o is not None])
