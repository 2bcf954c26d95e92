"""Where ZeRO-3 keeps the frozen parameters (`trainable.frozen_params`), and a count of the bytes it all-gathers.

partitioned (default): every parameter, frozen base included, lives as a 1/r ZeRO-3 partition and is all-gathered
whenever a module runs (tied-teacher forward, student forward, recomputed forward, backward: 4 gathers of the base
per micro-batch, measured). replicated: the frozen parameters are taken out of ZeRO-3 before `deepspeed.initialize` — each
becomes a non-persistent buffer of its module, whole on every rank — so only the trainable parameters, gradients,
fp32 master and Adam state are partitioned. Frozen memory per rank goes from b·N_f/r to b·N_f, frozen traffic to
none. The policy moves bytes, never values: a module computes with the same tensor either way.

Why buffers and not DeepSpeed's persistence flag (`ds_persist`, set by `stage3_param_persistence_threshold`): DeepSpeed
honours it only while its module trace is complete, and the tied teacher's forward enters the root module once more
per micro-batch, so the trace never completes and persistent parameters are released and gathered like the others
(measured while building this, see docs/SCALING.md). A buffer is outside ZeRO-3 altogether: never partitioned,
gathered, checkpointed (non-persistent: not in state_dict) or given a gradient; the engine's `.to(device)` moves it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

FrozenParams = Literal["partitioned", "replicated"]


def apply_frozen_params(module: torch.nn.Module, policy: FrozenParams, dtype: torch.dtype | None = None) -> int:
    """Apply the policy to `module` before `deepspeed.initialize`; returns the bytes made replicated (0 for
    partitioned). replicated: every parameter with requires_grad False becomes a non-persistent buffer of the same
    name holding the same tensor, so `module.weight` etc. still resolve and forward is unchanged.

    `dtype`: the dtype the engine gives parameters (bf16 on GPU). DeepSpeed casts parameters but keeps fp32
    buffers fp32, so frozen floating tensors are cast here to stay what they would have been as parameters."""
    if policy == "partitioned":
        return 0
    if policy != "replicated":
        raise ValueError(f"unknown frozen-parameter policy {policy!r}")
    moved = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or p.requires_grad:
                continue
            if hasattr(p, "ds_id"):
                raise ValueError("frozen_params 'replicated' must be applied before deepspeed.initialize")
            del sub._parameters[name]
            tensor = p.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            sub.register_buffer(name, tensor, persistent=False)
            moved += tensor.numel() * tensor.element_size()
    return moved


class GatherCount:
    """Bytes ZeRO-3 all-gathers on this rank, split by whether the parameter was trainable when counting started
    (not at gather time: disabling peft adapters for the tied teacher's forward clears their requires_grad).

    A gathered parameter materialises ds_numel × element size bytes on every rank ((r−1)/r of them received), so the
    count is that size for each parameter in each all-gather call DeepSpeed makes (`all_gather_coalesced`, used by the
    module hooks, and `all_gather`, used for persistent parameters and GatheredParameters). Our own count because
    DeepSpeed's comms logger reports per collective and cannot tell frozen from trainable parameters.
    """

    def __init__(self, trainable: set[int]) -> None:
        self.trainable = trainable  # ids of the trainable parameters
        self.frozen_bytes = 0
        self.trainable_bytes = 0
        self.frozen_gathers = 0
        self.trainable_gathers = 0

    def add(self, params) -> None:
        for p in params:
            if p.ds_status.name != "NOT_AVAILABLE":  # DeepSpeed skips what is already whole
                continue
            size = p.ds_numel * p.ds_tensor.element_size()
            if id(p) in self.trainable:
                self.trainable_bytes += size
                self.trainable_gathers += 1
            else:
                self.frozen_bytes += size
                self.frozen_gathers += 1

    def snapshot(self) -> dict[str, int]:
        return {"frozen_bytes": self.frozen_bytes, "trainable_bytes": self.trainable_bytes,
                "frozen_gathers": self.frozen_gathers, "trainable_gathers": self.trainable_gathers}


@contextmanager
def counting_gathers(module: torch.nn.Module) -> Iterator[GatherCount]:
    """Count the all-gathers of `module`'s ZeRO-3 parameters while the block runs (DeepSpeed attaches the gather
    functions to each parameter, so they are wrapped per parameter and restored afterwards)."""
    params = list(module.parameters())
    count = GatherCount({id(p) for p in params if p.requires_grad})
    originals = [(p, p.all_gather, p.all_gather_coalesced) for p in params]
    for p, gather, coalesced in originals:
        p.all_gather = _counted(gather, count, p)
        p.all_gather_coalesced = _counted(coalesced, count, p)
    try:
        yield count
    finally:
        for p, gather, coalesced in originals:
            p.all_gather, p.all_gather_coalesced = gather, coalesced


def _counted(fn, count: GatherCount, owner):
    def gather(param_list=None, *args, **kwargs):
        param_list = [owner] if param_list is None else list(param_list)
        count.add(param_list)
        return fn(param_list, *args, **kwargs)
    return gather
