"""Where autocast stops (spec §3.4a): the AsymFlow algebra runs in fp32 whatever autocast context the caller is in.

Autocast is meant for the transformer blocks. Under a bf16 autocast context every matmul/einsum outside them would
also run in bf16: the Oklab codec (x_0 off by ~0.02 rms in normalised Oklab, colour steps of > 5 sRGB codes), the
low-rank twin s·B·z and the recovery projections x·B·Bᵀ. Functions decorated with `fp32_algebra` switch autocast
off for the devices of their tensor arguments (and the CPU), so their result is the fp32 result bit for bit; the
caller's context is back in force as soon as they return, so model blocks called afterwards still autocast.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def _device_types(values: Iterable[object]) -> set[str]:
    """The device types of the tensors among `values`, plus "cpu" (CPU autocast is a separate switch)."""
    return {"cpu"} | {v.device.type for v in values if isinstance(v, torch.Tensor)}


@contextmanager
def autocast_off(*tensors: object) -> Iterator[None]:
    """Disable autocast on the CPU and on every device that holds one of `tensors`, for the block's duration."""
    with ExitStack() as stack:
        for device_type in sorted(_device_types(tensors)):
            if device_type != "meta":
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def fp32_algebra(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with autocast off for the devices of its tensor arguments (see module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with autocast_off(*args, *kwargs.values()):
            return fn(*args, **kwargs)

    return wrapper
