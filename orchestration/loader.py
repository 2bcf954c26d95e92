"""Per-rank streaming loader: reads this rank's slice of each planned global batch by byte range, ahead of the step."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from data_prep.reader import CorruptSampleError, DatasetIndex, read_training_sample, split_text

from .data_plan import (
    DataSection,
    DataState,
    GlobalBatch,
    check_batch_arithmetic,
    plan_epoch,
    position_after,
    rank_slice,
    steps_per_epoch,
)

log = logging.getLogger(__name__)

# images [b,3,H,W] and latents [b,128,H/16,W/16] in fp32, text_embeds [b,L,D] in bf16 (see _collate), keys list[str];
# for another family's cache also text_extras {name: [b,...]}, its other named text tensors (see _collate)
MicroBatch = dict[str, Any]


class UnreadableBucketError(RuntimeError):
    """Every sample that could stand in for a corrupt one is unreadable too: the dataset is broken, stop loudly."""


@dataclass(frozen=True)
class Replacement:
    """One corrupt sample and what was trained on in its place (for logs and tests)."""

    epoch: int
    batch: int
    shard: str
    key: str
    reason: str
    replaced_by: str


_Read = tuple[dict[str, Any], Replacement | None]  # a sample and, if it is a stand-in, what it stands in for


class RankLoader:
    """Iterates over this rank's steps forever (epoch after epoch); each step is `grad_accum` micro-batches.

    Order: step i of epoch e is global batch i of `plan_epoch(table, seed, e, G)`, sliced by `rank_slice`,
    so it depends on (seed, epoch, manifest, G) only — not on the world size or the number of loader threads.

    Corruption policy: a sample whose read raises `CorruptSampleError` (or an `OSError`, e.g. a vanished shard)
    is logged, counted and replaced by the first readable sample in this order: the rest of its own global
    batch (cyclically from the next position), then the other global batches of the same bucket in this
    epoch's plan (from the next one, wrapping around). The substitute is a function of the global plan and
    of which samples are unreadable, never of the rank or thread count, so every rank still gets the same
    number of full, bucket-homogeneous micro-batches (no collective can hang) and the order stays a pure
    function. Unreadable rows are remembered for the loader's lifetime so a dead shard is not re-read for
    each substitution. If no sample of the bucket is readable, `UnreadableBucketError` is raised.
    """

    def __init__(
        self,
        index: DatasetIndex,
        data: DataSection,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        grad_accum: int,
        global_batch: int,
        state: DataState | None = None,
        keys_log_steps: int = 10_000,
        pin_memory: bool = False,
    ) -> None:
        check_batch_arithmetic(global_batch, world_size, micro_batch, grad_accum)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.index, self.data = index, data
        self.pin_memory = pin_memory  # page-locked batches, so the GPU copy can be non-blocking
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.grad_accum, self.global_batch = micro_batch, grad_accum, global_batch
        self.steps_per_epoch = steps_per_epoch(index.table, global_batch, data.drop_remainder)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.path={data.path}: no bucket holds a full global batch of {global_batch} samples; "
                "lower train.global_batch or set data.drop_remainder=false"
            )
        start = state or DataState(
            epoch=0, batches_done=0, seed=data.seed, manifest_hash=index.manifest_hash, global_batch=global_batch
        )
        start.check_resumable(seed=data.seed, manifest_hash=index.manifest_hash, global_batch=global_batch)
        self._state = position_after(start, self.steps_per_epoch)
        self._next = (self._state.epoch, self._state.batches_done)  # next global batch to schedule for reading
        self._plans: dict[int, list[GlobalBatch]] = {}
        self._pool = (
            ThreadPoolExecutor(data.loader_workers, thread_name_prefix=f"loader-r{rank}") if data.loader_workers else None
        )
        self._pending: deque[tuple[list[GlobalBatch], GlobalBatch, list[list[Future | int]]]] = deque()
        self._lock = threading.Lock()  # guards the unreadable-row bookkeeping written from reader threads
        self._unreadable: dict[int, str] = {}  # row -> reason; a corrupt shard stays corrupt, don't re-read it
        self.corrupt_reads = 0  # failed reads, read-ahead included; each unreadable row fails once per loader
        self.replaced_samples = 0  # stand-ins in the steps handed out so far
        self.replacements: deque[Replacement] = deque(maxlen=1000)  # the most recent ones, for logs and tests
        self.data_wait_seconds = 0.0  # total time __next__ spent waiting for reads and collating
        self.last_wait_seconds = 0.0
        self.steps_yielded = 0
        self.keys_consumed: deque[list[str]] = deque(maxlen=keys_log_steps)

    # ------------------------------------------------------------------ public
    def state(self) -> DataState:
        """The data state after the last step handed out: what a checkpoint taken now must store."""
        return self._state

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        return self

    def __next__(self) -> list[MicroBatch]:
        if self._pool is None:
            self._schedule()
        else:
            while len(self._pending) <= self.data.prefetch_batches:
                self._schedule()
        plan, batch, micro_tasks = self._pending.popleft()
        started = time.perf_counter()
        reads = [[self._result(t, plan, batch) for t in tasks] for tasks in micro_tasks]
        micro = [self._collate([sample for sample, _ in samples]) for samples in reads]
        self.last_wait_seconds = time.perf_counter() - started
        self.data_wait_seconds += self.last_wait_seconds
        # Stand-ins are counted when their step is handed out, not when read ahead, so counts match steps trained.
        for replacement in (r for samples in reads for _, r in samples if r is not None):
            self.replaced_samples += 1
            self.replacements.append(replacement)
            log.warning("rank %d: epoch %d step %d: unreadable sample %s (%s) replaced by %s", self.rank,
                        replacement.epoch, replacement.batch, replacement.key, replacement.reason, replacement.replaced_by)
        if self._pool is not None:
            # Top the queue up now so the next step's reads overlap this step's compute.
            while len(self._pending) <= self.data.prefetch_batches:
                self._schedule()
        self._state = position_after(
            self._state.model_copy(update={"epoch": batch.epoch, "batches_done": batch.index + 1}), self.steps_per_epoch
        )
        self.steps_yielded += 1
        self.keys_consumed.append([k for m in micro for k in m["keys"]])
        return micro

    def close(self) -> None:
        """Stop the reader threads; pending reads are cancelled."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._next = (self._state.epoch, self._state.batches_done)  # cancelled read-ahead is scheduled again

    def __enter__(self) -> RankLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> list[GlobalBatch]:
        if epoch not in self._plans:
            # Queued reads hold their own plan reference, so dropping old epochs here is always safe.
            for old in [e for e in self._plans if e < epoch - 1]:
                del self._plans[old]
            self._plans[epoch] = plan_epoch(
                self.index.table, self.data.seed, epoch, self.global_batch,
                window_shards=self.data.window_shards, drop_remainder=self.data.drop_remainder,
            )
        return self._plans[epoch]

    def _schedule(self) -> None:
        """Queue the reads of the next global batch's slice for this rank."""
        epoch, i = self._next
        plan = self._plan(epoch)
        batch = plan[i]
        self._next = (epoch + 1, 0) if i + 1 == self.steps_per_epoch else (epoch, i + 1)
        # Slicing positions rather than rows tells each read where it sits in the global batch (for stand-ins).
        slices = rank_slice(list(range(self.global_batch)), self.rank, self.world_size, self.micro_batch, self.grad_accum)
        if self._pool is None:
            tasks: list[list[Future | int]] = [list(positions) for positions in slices]  # read when collected
        else:
            tasks = [[self._pool.submit(self._read_position, plan, batch, p) for p in positions] for positions in slices]
        self._pending.append((plan, batch, tasks))

    # ------------------------------------------------------------------ reading
    def _result(self, task: Future | int, plan: list[GlobalBatch], batch: GlobalBatch) -> _Read:
        return task.result() if isinstance(task, Future) else self._read_position(plan, batch, task)

    def _read_position(self, plan: list[GlobalBatch], batch: GlobalBatch, position: int) -> _Read:
        """The sample at `position` of `batch`, or its deterministic stand-in if it cannot be read."""
        row = batch.rows[position]
        for candidate in self._candidates(plan, batch, position):
            if candidate in self._unreadable:
                continue
            try:
                sample = read_training_sample(self.index, self.index.row(candidate))
            except (CorruptSampleError, OSError) as e:
                error = e if isinstance(e, CorruptSampleError) else self._as_corrupt(candidate, e)
                with self._lock:
                    self._unreadable[candidate] = error.reason
                    self.corrupt_reads += 1
                log.debug("rank %d: %s", self.rank, error)  # the warning comes with the step that uses the stand-in
                continue
            if candidate == row:
                return sample, None
            meta = self.index.row(row)
            stand_in = Replacement(batch.epoch, batch.index, meta["shard"], meta["key"], self._unreadable[row], sample["key"])
            return sample, stand_in
        raise UnreadableBucketError(
            f"no readable sample left in bucket {batch.bucket} of epoch {batch.epoch} to replace row {row} "
            f"(key {self.index.row(row)['key']}); {len(self._unreadable)} samples are unreadable — check the shards "
            f"of {self.index.data_dir}"
        )

    @staticmethod
    def _candidates(plan: list[GlobalBatch], batch: GlobalBatch, position: int) -> Iterator[int]:
        """The row itself, then the rest of its global batch cyclically, then same-bucket batches of the epoch."""
        g = len(batch.rows)
        for k in range(g):
            yield batch.rows[(position + k) % g]
        for j in range(1, len(plan)):
            other = plan[(batch.index + j) % len(plan)]
            if other.bucket == batch.bucket:
                yield from other.rows

    def _as_corrupt(self, row: int, error: OSError) -> CorruptSampleError:
        meta = self.index.row(row)
        return CorruptSampleError(meta["shard"], meta["key"], f"{type(error).__name__}: {error}")

    def _collate(self, samples: list[dict[str, Any]]) -> MicroBatch:
        """Stack one micro-batch. Text embeddings, the largest tensor by far (512 × 3 × 4096 values per sample at 9B),
        ship in bf16: exact for a bf16 cache (its values are bf16), and for an fp8 cache the dequantised values rounded
        to bf16, as the bf16 context embedder on the GPU would take them anyway; half the bytes of fp32 to move.
        A family cache's other text tensors (`text_extras`) ship alike: floating ones in bf16, integer masks as stored."""
        names = self.index.text_tensors
        texts = [split_text(s, names) for s in samples]
        shapes = {(tuple(s["image"].shape), tuple(s["latents"].shape), tuple(text.shape),
                   *(tuple(x.shape) for x in extras.values())) for s, (text, extras) in zip(samples, texts)}
        if len(shapes) != 1:
            raise ValueError(f"samples {[s['key'] for s in samples]} of one bucket differ in shape: {sorted(shapes)}")
        tensors = {
            "images": torch.stack([s["image"] for s in samples]).float(),
            "latents": torch.stack([s["latents"] for s in samples]).float(),
            "text_embeds": torch.stack([text for text, _ in texts]).to(torch.bfloat16),
        }
        extras = {name: shipped_text(torch.stack([e[name] for _, e in texts])) for name in texts[0][1]}
        if self.pin_memory:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
            extras = {name: t.pin_memory() for name, t in extras.items()}
        return {**tensors, **({"text_extras": extras} if extras else {}), "keys": [s["key"] for s in samples]}


def shipped_text(x: torch.Tensor) -> torch.Tensor:
    """A text tensor as batches carry it: floating values in bf16 (see `RankLoader._collate`), integer masks as is."""
    return x.to(torch.bfloat16) if x.is_floating_point() else x
