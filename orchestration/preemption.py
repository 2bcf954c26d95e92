"""Preemption: SIGTERM (or Ray's preemption notice) sets a flag; all ranks agree at a step boundary via all-reduce MAX."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist


class Preempted(RuntimeError):
    """Raised after the just-in-time checkpoint so Ray Train's FailureConfig restarts the worker group
    (returning normally would end the run as finished)."""


class PreemptionFlag:
    """A flag set by SIGTERM. A second SIGTERM falls through to the previous handler (exit)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Callable | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()

    def install(self) -> None:
        """Route SIGTERM to this flag in the current process."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_signal)
            return
        _install_in_ray_worker(self)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.event.is_set() and callable(self._previous):
            self._previous(signum, frame)
            return
        self.event.set()


def _install_in_ray_worker(flag: PreemptionFlag) -> None:
    """Ray Train runs the train function in a thread, and Python only lets the main thread install signal
    handlers. Ray's worker main thread already has a SIGTERM handler that calls the module-level
    `raise_sys_exit_with_custom_error_message` of `ray._private.worker` (Ray 2.60); wrapping that name turns
    the first SIGTERM into our flag and lets a second one exit as before."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "_asymflow_original_exit", ray_worker.raise_sys_exit_with_custom_error_message)
    ray_worker._asymflow_original_exit = original

    def on_exit_request(message: str, exit_code: int = 1) -> None:
        if "SIGTERM" in str(message) and not flag.is_set():
            flag.set()
            return
        original(message, exit_code=exit_code)

    ray_worker.raise_sys_exit_with_custom_error_message = on_exit_request


def maybe_ray_preemption_notice() -> bool:
    """True when Ray reports an imminent node preemption for this run (Train V2 `get_preemption_info`).

    Every rank must call this the same number of times (it is collective in Ray Train)."""
    try:
        import ray.train

        return ray.train.get_preemption_info() is not None
    except (ImportError, AttributeError, RuntimeError):
        return False


CONTINUE, PREEMPT, STOP = 0, 1, 2  # what a rank wants at a step boundary; a stop outranks a preemption


def agree_to_stop(local: int) -> int:
    """All-reduce MAX of the local wishes (CONTINUE / PREEMPT / STOP): every rank gets the same answer at the same
    step boundary. A stop wins over a preemption: one checkpoint, and the run ends instead of restarting."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(local)
    flag = torch.tensor([int(local)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
