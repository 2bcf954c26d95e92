"""Goodput of a run over all its attempts: interruptions, steps lost, wall time lost to restarts, checkpoint stall,
data wait, effective samples/s.

What survives a restart is carried in each checkpoint's `state.json` (`Goodput.state()`), and every interruption
is appended to the run ledger when the next attempt starts. An attempt can die before it writes any checkpoint
(two kills between the same pair of checkpoints), so the state alone would forget it; the counts that must not
under-count (interruptions, steps lost) therefore continue from the ledger's last interruption event.

Steps lost are counted exactly from the per-step key log: every executed step appends one record, so after
restoring step k, (records so far) − k is the number of steps ever executed that are not part of the run's
history — summed over all interruptions, whatever the order of kills.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable


def executed_steps(key_records: Iterable[str]) -> int:
    """Steps executed so far (one JSON record each; a line torn by a kill is not a completed step)."""
    count = 0
    for line in key_records:
        try:
            json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        count += 1
    return count


@dataclass
class Goodput:
    """Running totals over the whole run (all attempts). Times in seconds; `run_start_time` is a Unix time."""

    run_start_time: float = 0.0
    restart_lost_s: float = 0.0
    checkpoint_stall_s: float = 0.0
    total_data_wait_s: float = 0.0
    total_step_time_s: float = 0.0
    interruptions: int = 0
    steps_lost: int = 0

    # ------------------------------------------------------------------ state.json

    def state(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Goodput:
        """From a checkpoint's state.json (its `goodput` section; older checkpoints kept `steps_lost` top-level)."""
        saved = dict(state.get("goodput", {}))
        saved.setdefault("steps_lost", state.get("steps_lost", 0))
        out = cls()
        for f in fields(cls):
            if f.name in saved:
                setattr(out, f.name, type(getattr(out, f.name))(saved[f.name]))
        return out

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> None:
        self.run_start_time = now

    def add_step(self, step_s: float, data_wait_s: float) -> None:
        self.total_step_time_s += step_s
        self.total_data_wait_s += data_wait_s

    def add_checkpoint(self, seconds: float) -> None:
        self.checkpoint_stall_s += seconds

    def resume(self, restored: dict[str, Any], now: float, steps_lost_total: int,
               ledger_events: list[dict[str, Any]]) -> dict[str, Any]:
        """Account one interruption when an attempt resumes from the checkpoint whose state is `restored`.

        `steps_lost_total`: steps executed but not in the history up to the restored step, over the whole run.
        `ledger_events`: this run's earlier `interruption` events (may be empty). The wall time lost is from the
        checkpoint's write to now (ready to train again): it contains the redone steps' first execution and the
        restart itself, and it also covers any attempt that died before writing a checkpoint, so it is added to
        the restored total rather than to the ledger's. Returns the ledger event describing this interruption."""
        restored_at = float(restored.get("time", now))
        if not self.run_start_time:
            self.run_start_time = restored_at
        lost_s = max(now - restored_at, 0.0)
        self.restart_lost_s += lost_s
        previous = ledger_events[-1] if ledger_events else None
        before = int(previous["steps_lost_total"]) if previous and "steps_lost_total" in previous else self.steps_lost
        self.steps_lost = max(steps_lost_total, before)
        self.interruptions = max(self.interruptions, len(ledger_events)) + 1
        # Graceful (checkpointed on a preemption notice) only if the dying attempt wrote the restored checkpoint
        # itself: one restored again after a later crash was written before the previous resume.
        written_by_last_attempt = previous is None or restored_at > float(previous.get("time", 0.0))
        return {"interruption": self.interruptions, "step": int(restored["step"]),
                "steps_lost": self.steps_lost - before, "steps_lost_total": self.steps_lost,
                "preempted": bool(restored.get("preempted")) and written_by_last_attempt, "lost_s": round(lost_s, 3)}

    # ------------------------------------------------------------------ report

    def metrics(self, step: int, global_batch: int, now: float | None = None) -> dict[str, float]:
        """The run's goodput at `step`: wall time lost to restarts, time training stood still for checkpoints,
        fraction of step time spent waiting for data, and useful samples per wall-clock second since the start."""
        wall = max((time.time() if now is None else now) - self.run_start_time, 1e-9)
        return {
            "goodput/restart_lost_s": self.restart_lost_s,
            "goodput/checkpoint_stall_s": self.checkpoint_stall_s,
            "goodput/data_wait_frac": self.total_data_wait_s / self.total_step_time_s if self.total_step_time_s else 0.0,
            "goodput/effective_samples_per_s": step * global_batch / wall,
            "goodput/wall_s": wall,
            "goodput/interruptions": self.interruptions,
            "goodput/steps_lost": self.steps_lost,
        }
