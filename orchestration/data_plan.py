"""The epoch plan: bucket-homogeneous global batches as a pure function of (seed, epoch, manifest rows, global batch)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import pyarrow as pa

# The manifest's per-sample table: a pyarrow table or row mappings with at least `shard` and `bucket`.
Rows: TypeAlias = "pa.Table | Sequence[Mapping[str, Any]]"

# Stream identifiers mixed into every SeedSequence, so the shard shuffle and the per-window sample
# shuffles of one (seed, epoch) are independent draws that never depend on each other's length.
_SHARD_STREAM = 0
_WINDOW_STREAM = 1


class DataSection(BaseModel):
    """The `data:` section of the run config: where the shards are and how the epoch is planned and read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    seed: int = Field(default=0, ge=0)
    window_shards: int = Field(default=4, ge=1, description="shards whose samples are shuffled together (K)")
    loader_workers: int = Field(default=2, ge=0, description="decode threads per rank; 0 reads inline, without read-ahead")
    prefetch_batches: int = Field(default=2, ge=0, description="steps read ahead of the one being trained on")
    drop_remainder: bool = Field(
        default=True,
        description="drop each bucket's last partial global batch (True) or pad it by repeating its own samples",
    )


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's samples: row indices into the sample table, all from one bucket, in order."""

    epoch: int
    index: int
    bucket: str
    rows: tuple[int, ...]


class DataState(BaseModel):
    """Where the data stream stands: enough to resume exactly, small enough for a checkpoint's state.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int = Field(ge=0)
    batches_done: int = Field(ge=0, description="global batches of `epoch` already consumed")
    seed: int = Field(ge=0)
    manifest_hash: str
    global_batch: int = Field(gt=0, description="G the plan was made for; batches_done only means something for it")

    @property
    def samples_seen(self) -> int:
        """Samples consumed in the current epoch (every planned batch holds exactly G samples)."""
        return self.batches_done * self.global_batch

    def check_resumable(self, *, seed: int, manifest_hash: str, global_batch: int) -> None:
        """Refuse to resume into a different data order: same seed, same dataset, same G."""
        for name, saved, now in (
            ("data.seed", self.seed, seed),
            ("manifest hash", self.manifest_hash, manifest_hash),
            ("global batch", self.global_batch, global_batch),
        ):
            if saved != now:
                raise ValueError(
                    f"cannot resume the data stream: the checkpoint's {name} is {saved!r} but this run's is {now!r}; "
                    "the data order would not continue exactly"
                )


def _factorize(rows: Rows, column: str) -> tuple[list[str], np.ndarray]:
    """(sorted distinct values, code of each row) for one string column; codes follow the sorted names, so they
    depend only on the table's content."""
    if hasattr(rows, "column_names"):  # pyarrow.Table: encode the column natively, never materialise rows
        encoded = rows.column(column).combine_chunks().cast("string").dictionary_encode()
        names = [str(v) for v in encoded.dictionary.to_pylist()]
        order = sorted(range(len(names)), key=names.__getitem__)
        rank = np.empty(len(names), dtype=np.int64)
        rank[order] = np.arange(len(names))
        return [names[i] for i in order], rank[encoded.indices.to_numpy(zero_copy_only=False)]
    if not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a pyarrow.Table or a sequence of mappings, got {type(rows).__name__}")
    values = [str(r[column]) for r in rows]
    names = sorted(set(values))
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


def _generator(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    # Derived integers only: Python's hash() is salted per process and would break cross-process equality.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *stream])))


def bucket_counts(rows: Rows) -> dict[str, int]:
    """Samples per bucket, in bucket-name order."""
    names, codes = _factorize(rows, "bucket")
    return dict(zip(names, np.bincount(codes, minlength=len(names)).tolist()))


def steps_per_epoch(rows: Rows, global_batch: int, drop_remainder: bool = True) -> int:
    """Global batches per epoch: Σ_b ⌊n_b/G⌋ (dropping) or Σ_b ⌈n_b/G⌉ (padding).

    Because a bucket's remainder carries from window to window, this does not depend on the seed, the
    epoch or the window size — every epoch has the same number of steps.
    """
    _check_positive("global_batch", global_batch)
    counts = bucket_counts(rows).values()
    if drop_remainder:
        return sum(n // global_batch for n in counts)
    return sum(-(-n // global_batch) for n in counts)


def plan_epoch(
    rows: Rows,
    seed: int,
    epoch: int,
    global_batch: int,
    *,
    window_shards: int = 4,
    drop_remainder: bool = True,
) -> list[GlobalBatch]:
    """Plan one epoch: shuffle shards, walk them in windows of K, shuffle samples within a window, and emit a
    bucket-homogeneous global batch of G each time a bucket has collected G samples.

    A bucket's partial batch carries over to the next window. At the end of the epoch each bucket's
    remainder (< G samples) is dropped, or, with `drop_remainder=False`, padded to G by cycling through
    that remainder itself (the only repeats in an epoch). Final remainders are emitted in bucket-name
    order. Within a window, batches are ordered by the shuffled position of the sample that completed
    them, so buckets interleave the way they occur in the data.

    `rows` are the manifest's per-sample table (needs `shard` and `bucket`); `GlobalBatch.rows` index it.
    """
    _check_positive("global_batch", global_batch)
    _check_positive("window_shards", window_shards)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
    shard_names, shard_of_row = _factorize(rows, "shard")
    bucket_names, bucket_of_row = _factorize(rows, "bucket")
    # Row indices grouped by shard, each group in table order (stable sort keeps it canonical).
    shard_sizes = np.bincount(shard_of_row, minlength=len(shard_names))
    by_shard = np.split(np.argsort(shard_of_row, kind="stable"), np.cumsum(shard_sizes)[:-1])

    shard_order = _generator(seed, epoch, _SHARD_STREAM).permutation(len(shard_names))
    carry: dict[int, np.ndarray] = {}
    plan: list[GlobalBatch] = []
    for w, start in enumerate(range(0, len(shard_order), window_shards)):
        window_rows = np.concatenate([by_shard[s] for s in shard_order[start : start + window_shards]])
        shuffled = _generator(seed, epoch, _WINDOW_STREAM, w).permutation(window_rows)
        codes = bucket_of_row[shuffled]
        completed: list[tuple[int, int, np.ndarray]] = []  # (position that completed it, bucket, rows)
        for b in np.flatnonzero(np.bincount(codes, minlength=len(bucket_names))):
            positions = np.flatnonzero(codes == b)
            pending = carry.get(int(b), np.empty(0, dtype=np.int64))
            joined = np.concatenate([pending, shuffled[positions]])
            full = len(joined) // global_batch
            for j in range(full):
                last = (j + 1) * global_batch - 1 - len(pending)  # ≥ 0: a carry is always shorter than G
                completed.append((int(positions[last]), int(b), joined[j * global_batch : (j + 1) * global_batch]))
            carry[int(b)] = joined[full * global_batch :]
        for _, b, batch_rows in sorted(completed, key=lambda c: c[0]):
            plan.append(GlobalBatch(epoch, len(plan), bucket_names[b], tuple(batch_rows.tolist())))
    if not drop_remainder:
        for b in sorted(carry):
            if len(carry[b]):
                padded = np.resize(carry[b], global_batch)  # cycles the remainder: deterministic repeats
                plan.append(GlobalBatch(epoch, len(plan), bucket_names[b], tuple(padded.tolist())))
    return plan


def iter_plan(
    rows: Rows, start: DataState, *, window_shards: int = 4, drop_remainder: bool = True
) -> Iterator[GlobalBatch]:
    """Global batches from `start` on, rolling into the next epoch's plan forever.

    Resuming costs one `plan_epoch` (metadata only): the first batch is found by index, not by reading
    through the skipped ones.
    """
    n_steps = steps_per_epoch(rows, start.global_batch, drop_remainder)
    if n_steps == 0:
        raise ValueError(
            f"no bucket holds a full global batch of {start.global_batch} samples (buckets: {bucket_counts(rows)}); "
            "an epoch would have no steps — lower the global batch or set data.drop_remainder=false"
        )
    state = position_after(start, n_steps)
    epoch, first = state.epoch, state.batches_done
    while True:
        plan = plan_epoch(rows, state.seed, epoch, state.global_batch, window_shards=window_shards,
                          drop_remainder=drop_remainder)
        yield from plan[first:]
        epoch, first = epoch + 1, 0


def check_batch_arithmetic(global_batch: int, world_size: int, micro_batch: int, grad_accum: int) -> None:
    """G must be exactly world_size × micro_batch × grad_accum: one global batch is one optimizer step."""
    for name, value in (("global_batch", global_batch), ("world_size", world_size), ("micro_batch", micro_batch),
                        ("grad_accum", grad_accum)):
        _check_positive(name, value)
    per_step = world_size * micro_batch * grad_accum
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not divisible by world_size × micro_batch × grad_accum = "
            f"{world_size} × {micro_batch} × {grad_accum} = {per_step}"
        )
    if global_batch != per_step:
        # Divisible but larger would make one planned batch span several optimizer steps and break the
        # (epoch, batches_done) resume position; raise grad_accum instead.
        raise ValueError(
            f"global batch {global_batch} must equal world_size × micro_batch × grad_accum = "
            f"{world_size} × {micro_batch} × {grad_accum} = {per_step}; use grad_accum = "
            f"{global_batch // (world_size * micro_batch)}"
        )


def rank_slice(
    global_batch: GlobalBatch | Sequence[int],
    rank: int,
    world_size: int,
    micro_batch: int,
    grad_accum: int,
) -> list[list[int]]:
    """This rank's `grad_accum` micro-batches (row indices) of one step.

    Rank r takes the contiguous part [r·G/W, (r+1)·G/W) and cuts it into micro-batches in order, so
    concatenating all ranks' micro-batches in rank order gives back the global batch for any W.
    """
    rows = list(global_batch.rows if isinstance(global_batch, GlobalBatch) else global_batch)
    check_batch_arithmetic(len(rows), world_size, micro_batch, grad_accum)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    per_rank = micro_batch * grad_accum
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    return [mine[m * micro_batch : (m + 1) * micro_batch] for m in range(grad_accum)]


def position_after(state: DataState, steps_in_epoch: int) -> DataState:
    """Normalise a state whose epoch is finished to the start of the next epoch (no samples are read)."""
    _check_positive("steps_in_epoch", steps_in_epoch)
    if state.batches_done > steps_in_epoch:
        raise ValueError(f"data state has {state.batches_done} batches done but epoch {state.epoch} has only "
                         f"{steps_in_epoch}; was the plan built for another dataset or global batch?")
    if state.batches_done == steps_in_epoch:
        return state.model_copy(update={"epoch": state.epoch + 1, "batches_done": 0})
    return state


def state_at_step(
    global_step: int, steps_in_epoch: int, *, seed: int, manifest_hash: str, global_batch: int
) -> DataState:
    """The data state after `global_step` optimizer steps from the start (every epoch has the same length)."""
    _check_positive("steps_in_epoch", steps_in_epoch)
    if global_step < 0:
        raise ValueError(f"global_step must be non-negative, got {global_step}")
    epoch, done = divmod(global_step, steps_in_epoch)
    return DataState(epoch=epoch, batches_done=done, seed=seed, manifest_hash=manifest_hash, global_batch=global_batch)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


__all__ = [
    "DataSection",
    "DataState",
    "GlobalBatch",
    "bucket_counts",
    "check_batch_arithmetic",
    "iter_plan",
    "plan_epoch",
    "position_after",
    "rank_slice",
    "state_at_step",
    "steps_per_epoch",
]
