"""Goodput accounting (issue 7 item 6) on hand-built histories whose answers follow from counting."""
from __future__ import annotations

import json

import pytest

from orchestration.goodput import Goodput, executed_steps


def _lines(*steps: int, torn: bool = False) -> list[str]:
    out = [json.dumps({"step": s, "keys": [f"k{s}"]}) for s in steps]
    return out + (['{"step": 9, "ke'] if torn else [])


def test_executed_steps_counts_complete_records_only():
    assert executed_steps(_lines(0, 1, 2, 1, 2, torn=True)) == 5
    assert executed_steps([]) == 0


def test_two_kills_between_the_same_checkpoints_are_both_counted():
    """Checkpoint at step 2 (t = 100). Attempt A resumes from it at t = 130, redoes 2..4 and dies before the
    step-4 checkpoint; attempt B resumes from the same checkpoint at t = 170. The checkpoint's state never saw A,
    so interruptions and steps lost continue from the ledger event A wrote."""
    checkpoint = {"step": 2, "time": 100.0, "preempted": False, "steps_lost": 0,
                  "goodput": {"run_start_time": 40.0, "restart_lost_s": 0.0, "interruptions": 0, "steps_lost": 0}}
    # First run: steps 0..3 executed, killed after step 3 → 4 records, 2 of them (steps 2, 3) beyond the checkpoint.
    a = Goodput.from_state(checkpoint)
    event_a = a.resume(checkpoint, now=130.0, steps_lost_total=4 - 2, ledger_events=[])
    assert (event_a["interruption"], event_a["steps_lost"], event_a["steps_lost_total"]) == (1, 2, 2)
    assert a.restart_lost_s == pytest.approx(30.0)
    # Attempt A executed steps 2, 3, 4 (3 more records, 7 in all) and died.
    b = Goodput.from_state(checkpoint)
    event_b = b.resume(checkpoint, now=170.0, steps_lost_total=7 - 2, ledger_events=[{"kind": "interruption", **event_a}])
    assert (event_b["interruption"], event_b["steps_lost"], event_b["steps_lost_total"]) == (2, 3, 5)
    assert (b.interruptions, b.steps_lost) == (2, 5)
    # Wall time lost runs from the checkpoint's write to the restart that follows it: 70 s, A's 30 s inside it.
    assert b.restart_lost_s == pytest.approx(70.0)
    assert b.run_start_time == 40.0


def test_sigterm_checkpoint_loses_no_step():
    """A preemption checkpoint is written at the last executed step: records − step is unchanged → 0 lost."""
    checkpoint = {"step": 5, "time": 10.0, "preempted": True,
                  "goodput": {"run_start_time": 1.0, "interruptions": 1, "steps_lost": 1, "restart_lost_s": 4.0}}
    g = Goodput.from_state(checkpoint)
    earlier = [{"kind": "interruption", "interruption": 1, "steps_lost": 1, "steps_lost_total": 1}]
    event = g.resume(checkpoint, now=12.5, steps_lost_total=6 - 5, ledger_events=earlier)
    assert event == {"interruption": 2, "step": 5, "steps_lost": 0, "steps_lost_total": 1, "preempted": True,
                     "lost_s": 2.5}
    assert g.restart_lost_s == pytest.approx(6.5)


def test_metrics_are_the_ratios_they_name():
    g = Goodput()
    g.start(now=1000.0)
    for step_s, wait_s in [(2.0, 0.5), (2.0, 0.0), (1.0, 0.5)]:
        g.add_step(step_s, wait_s)
    g.add_checkpoint(3.0)
    g.add_checkpoint(1.5)
    m = g.metrics(step=3, global_batch=4, now=1020.0)
    assert m["goodput/data_wait_frac"] == pytest.approx(1.0 / 5.0)
    assert m["goodput/checkpoint_stall_s"] == pytest.approx(4.5)
    assert m["goodput/wall_s"] == pytest.approx(20.0)
    assert m["goodput/effective_samples_per_s"] == pytest.approx(3 * 4 / 20.0)
    assert m["goodput/interruptions"] == 0 and m["goodput/restart_lost_s"] == 0.0


def test_state_round_trip_and_old_checkpoints():
    g = Goodput(run_start_time=5.0, restart_lost_s=1.5, checkpoint_stall_s=2.0, total_data_wait_s=0.25,
                total_step_time_s=9.0, interruptions=3, steps_lost=4)
    assert Goodput.from_state({"goodput": g.state()}) == g
    # Checkpoints written before `steps_lost` moved into the goodput section kept it at the top level.
    assert Goodput.from_state({"steps_lost": 2, "goodput": {"interruptions": 1}}).steps_lost == 2


def test_a_crash_after_a_preemption_checkpoint_is_not_graceful():
    """SIGTERM → preemption checkpoint at step 4 (t = 50) → resumed at t = 60 (ledger event) → SIGKILL → resumed
    from the same checkpoint: that checkpoint was not written by the attempt that died, so this was no graceful
    preemption, and its steps count as lost."""
    checkpoint = {"step": 4, "time": 50.0, "preempted": True, "goodput": {"run_start_time": 1.0}}
    first = Goodput.from_state(checkpoint).resume(checkpoint, now=60.0, steps_lost_total=0, ledger_events=[])
    assert first["preempted"] and first["steps_lost"] == 0
    second = Goodput.from_state(checkpoint).resume(checkpoint, now=90.0, steps_lost_total=2,
                                                   ledger_events=[{"kind": "interruption", "time": 60.0, **first}])
    assert not second["preempted"] and second["steps_lost"] == 2 and second["interruption"] == 2

