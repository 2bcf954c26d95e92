"""The learning-rate factor of a step: linear warmup (spec §9), then constant, cosine or linear decay to min_lr."""
from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine", "linear"]


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """Linear warmup from start_factor·lr at step 0 to lr at `warmup_steps`, then 1 (spec §9)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def decay_factor(step: int, warmup_steps: int, total_steps: int, schedule: Schedule, min_ratio: float) -> float:
    """After warmup: 1 (constant), or from 1 down to `min_ratio` (= min_lr / lr) at `total_steps`, along a half
    cosine `m + (1 − m)·½(1 + cos πq)` or a line `m + (1 − m)(1 − q)`, q = progress through the decay phase."""
    if schedule == "constant" or step < warmup_steps:
        return 1.0
    q = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * q)) if schedule == "cosine" else 1.0 - q
    return min_ratio + (1.0 - min_ratio) * shape


def lr_factor(step: int, *, warmup_steps: int, start_factor: float, total_steps: int, schedule: Schedule = "constant",
              min_ratio: float = 0.0) -> float:
    """Multiplier of every parameter group's base lr at `step` (per-module multipliers keep their ratio)."""
    factor = warmup_factor(step, warmup_steps, start_factor)
    if schedule == "constant":
        return factor  # exactly the warmup factor: constant runs stay bitwise what they were
    return factor * decay_factor(step, warmup_steps, total_steps, schedule, min_ratio)
