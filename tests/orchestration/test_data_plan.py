"""Epoch plan: determinism, bucket homogeneity, coverage, world-size independence, exact resume, batch arithmetic."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from orchestration.data_plan import (
    DataSection,
    DataState,
    bucket_counts,
    iter_plan,
    plan_epoch,
    position_after,
    rank_slice,
    state_at_step,
    steps_per_epoch,
)

BUCKETS = ("64x64", "64x48", "48x64")
G = 8


def make_rows(n_shards: int = 12, per_shard: int = 17, buckets: tuple[str, ...] = BUCKETS) -> list[dict]:
    """Rows shaped like data_prep's samples.parquet, with an uneven bucket mix so remainders exist."""
    rows = []
    for s in range(n_shards):
        for i in range(per_shard):
            n = s * per_shard + i
            bucket = buckets[(n * n + s) % len(buckets)]
            rows.append({"key": f"{n:09d}", "shard": f"shard-{s:06d}.tar", "index": i, "bucket": bucket})
    return rows


def state(batches_done: int = 0, epoch: int = 0, seed: int = 0) -> DataState:
    return DataState(epoch=epoch, batches_done=batches_done, seed=seed, manifest_hash="m" * 64, global_batch=G)


def sequence(plan) -> list[int]:
    return [r for b in plan for r in b.rows]


def test_same_inputs_same_plan_and_table_or_dicts_agree():
    rows = make_rows()
    a = plan_epoch(rows, seed=3, epoch=1, global_batch=G, window_shards=4)
    assert a == plan_epoch(rows, seed=3, epoch=1, global_batch=G, window_shards=4)
    assert a == plan_epoch(pa.Table.from_pylist(rows), seed=3, epoch=1, global_batch=G, window_shards=4)
    assert [b.index for b in a] == list(range(len(a))) and {b.epoch for b in a} == {1}


def test_seed_and_epoch_change_the_order():
    rows = make_rows()
    base = sequence(plan_epoch(rows, 0, 0, G))
    assert sequence(plan_epoch(rows, 1, 0, G)) != base
    assert sequence(plan_epoch(rows, 0, 1, G)) != base


def test_plan_is_identical_in_a_fresh_process_with_another_hash_seed():
    # Guards against any use of Python's salted hash() or set iteration order in the plan.
    code = (
        "import json, sys; sys.path.insert(0, 'tests/orchestration'); "
        "from test_data_plan import make_rows, sequence, G; from orchestration.data_plan import plan_epoch; "
        "print(json.dumps(sequence(plan_epoch(make_rows(), 5, 2, G))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(out.stdout) == sequence(plan_epoch(make_rows(), 5, 2, G))


def test_batches_are_bucket_homogeneous_and_all_buckets_interleave():
    rows = make_rows()
    plan = plan_epoch(rows, 0, 0, G)
    for b in plan:
        assert len(b.rows) == G
        assert {rows[r]["bucket"] for r in b.rows} == {b.bucket}
    assert {b.bucket for b in plan[: len(plan) // 2]} == set(BUCKETS)


@pytest.mark.parametrize("window_shards", [1, 3, 4, 100])
@pytest.mark.parametrize("seed", [0, 7])
def test_every_sample_once_except_the_dropped_remainders(window_shards, seed):
    rows = make_rows()
    plan = plan_epoch(rows, seed, 0, G, window_shards=window_shards)
    seen = sequence(plan)
    assert len(seen) == len(set(seen)), "a sample was repeated within an epoch"
    dropped = Counter(rows[r]["bucket"] for r in set(range(len(rows))) - set(seen))
    counts = bucket_counts(rows)
    assert dict(dropped) == {b: n % G for b, n in counts.items() if n % G}
    assert len(plan) == steps_per_epoch(rows, G) == sum(n // G for n in counts.values())


def test_padding_instead_of_dropping_covers_everything_and_repeats_only_in_the_last_batches():
    rows = make_rows()
    plan = plan_epoch(rows, 0, 0, G, drop_remainder=False)
    counts = bucket_counts(rows)
    n_padded = sum(1 for n in counts.values() if n % G)
    assert len(plan) == steps_per_epoch(rows, G, drop_remainder=False)
    assert set(sequence(plan)) == set(range(len(rows)))
    head = sequence(plan[:-n_padded])
    assert len(head) == len(set(head))
    assert [b.bucket for b in plan[-n_padded:]] == sorted(b for b, n in counts.items() if n % G)
    for b in plan[-n_padded:]:
        assert {rows[r]["bucket"] for r in b.rows} == {b.bucket}


def test_windows_bound_how_many_shards_a_batch_mixes():
    # One bucket, shards holding exactly 2·G samples and windows of one shard: every batch comes from one shard.
    rows = make_rows(n_shards=6, per_shard=2 * G, buckets=("64x64",))
    for b in plan_epoch(rows, 0, 0, G, window_shards=1):
        assert len({rows[r]["shard"] for r in b.rows}) == 1
    mixed = plan_epoch(rows, 0, 0, G, window_shards=6)
    assert max(len({rows[r]["shard"] for r in b.rows}) for b in mixed) > 1


def test_steps_per_epoch_does_not_depend_on_seed_epoch_or_window():
    rows = make_rows()
    lengths = {len(plan_epoch(rows, s, e, G, window_shards=k)) for s, e, k in itertools.product((0, 1), (0, 3), (1, 5))}
    assert lengths == {steps_per_epoch(rows, G)}


@pytest.mark.parametrize("world_size,micro,accum", [(1, 2, 4), (2, 2, 2), (4, 1, 2), (8, 1, 1)])
def test_world_size_changes_only_the_slicing(world_size, micro, accum):
    plan = plan_epoch(make_rows(), 0, 0, G)
    for b in plan:
        parts = [rank_slice(b, r, world_size, micro, accum) for r in range(world_size)]
        assert all(len(p) == accum and all(len(m) == micro for m in p) for p in parts)
        assert [row for p in parts for m in p for row in m] == list(b.rows)


def test_rank_slice_arithmetic_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"global batch 10 is not divisible by .* 4 × 1 × 1 = 4"):
        rank_slice(list(range(10)), 0, 4, 1, 1)
    with pytest.raises(ValueError, match=r"global batch 16 must equal .* 2 × 2 × 2 = 8; use grad_accum = 4"):
        rank_slice(list(range(16)), 0, 2, 2, 2)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, world_size=2\)"):
        rank_slice(list(range(8)), 2, 2, 2, 2)
    with pytest.raises(ValueError, match="micro_batch must be positive, got 0"):
        rank_slice(list(range(8)), 0, 2, 0, 2)


def uninterrupted(rows, n: int, **kw) -> list:
    return list(itertools.islice(iter_plan(rows, state(), **kw), n))


@pytest.mark.parametrize("k", [0, 1, 5, 10, 11, 23])
def test_resume_at_step_k_reproduces_the_rest_across_epoch_boundaries(k):
    rows = make_rows()
    n_steps = steps_per_epoch(rows, G)
    total = 2 * n_steps + 3
    reference = uninterrupted(rows, total, window_shards=3)
    saved = state_at_step(k, n_steps, seed=0, manifest_hash="m" * 64, global_batch=G)
    restored = DataState.model_validate_json(saved.model_dump_json())
    resumed = list(itertools.islice(iter_plan(rows, restored, window_shards=3), total - k))
    assert resumed == reference[k:]


def test_resume_with_a_different_world_size_continues_the_same_sample_sequence():
    rows = make_rows()
    reference = [row for b in uninterrupted(rows, 12) for row in b.rows]
    first = [row for b in uninterrupted(rows, 5) for r in range(2) for m in rank_slice(b, r, 2, 2, 2) for row in m]
    rest = list(itertools.islice(iter_plan(rows, state(batches_done=5)), 7))
    second = [row for b in rest for r in range(4) for m in rank_slice(b, r, 4, 1, 2) for row in m]
    assert first + second == reference


def test_finished_epoch_state_rolls_over_without_reading():
    s = state(batches_done=10, epoch=2)
    assert position_after(s, 10) == state(batches_done=0, epoch=3)
    assert position_after(s, 11) == s
    with pytest.raises(ValueError, match="11 batches done but epoch 2 has only 10"):
        position_after(state(batches_done=11, epoch=2), 10)
    first = next(iter_plan(make_rows(), state(batches_done=steps_per_epoch(make_rows(), G))))
    assert (first.epoch, first.index) == (1, 0)


def test_no_full_batch_is_an_error_not_an_endless_loop():
    with pytest.raises(ValueError, match="no bucket holds a full global batch of 8"):
        next(iter_plan(make_rows(n_shards=1, per_shard=5), state()))


def test_data_state_is_tiny_json_and_refuses_a_different_stream():
    s = state(batches_done=4, epoch=1, seed=9)
    assert json.loads(s.model_dump_json()) == {
        "epoch": 1, "batches_done": 4, "seed": 9, "manifest_hash": "m" * 64, "global_batch": G,
    }
    assert s.samples_seen == 32
    s.check_resumable(seed=9, manifest_hash="m" * 64, global_batch=G)
    with pytest.raises(ValueError, match="manifest hash"):
        s.check_resumable(seed=9, manifest_hash="x" * 64, global_batch=G)
    with pytest.raises(ValueError, match="global batch is 8 but this run's is 16"):
        s.check_resumable(seed=9, manifest_hash="m" * 64, global_batch=16)
    with pytest.raises(ValidationError):
        DataState.model_validate({**s.model_dump(), "extra": 1})


def test_data_section_defaults_and_unknown_keys():
    section = DataSection(path="/data")
    assert (section.seed, section.window_shards, section.loader_workers, section.prefetch_batches,
            section.drop_remainder) == (0, 4, 2, 2, True)
    with pytest.raises(ValidationError, match="shuffle"):
        DataSection(path="/data", shuffle=True)
    with pytest.raises(ValidationError, match="window_shards"):
        DataSection(path="/data", window_shards=0)
