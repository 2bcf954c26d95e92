"""The DeepSpeed config dict, derived from the typed run config (never written by hand)."""
from __future__ import annotations

from typing import Any

from orchestration.config import TrainSection


def build_deepspeed_config(
    train: TrainSection, world_size: int, use_gpu: bool, load_universal: bool = False
) -> dict[str, Any]:
    """ZeRO stage 3 with the batch arithmetic of `train` at `world_size`.

    Precision: bf16 on GPU (trainable master weights stay fp32 inside DeepSpeed), fp32 on CPU. Gradients are
    reduce-scattered in fp32 on every device (`communication_data_type`): with bf16 on, DeepSpeed would otherwise
    reduce in bf16 across all ranks (32 in the 9B recipe), where the reference all-reduces fp32. Only the
    trainable set (~4 % of the model) has gradients, so the extra traffic is small.
    Clipping is done by us (DeepSpeed's `gradient_clipping` is off): the spec clips at 200 only from step 100
    and skips non-finite steps, which DeepSpeed's fixed clip cannot express. The optimizer and LR schedule
    are built by the worker from our param groups, so no `optimizer`/`scheduler` block appears here.
    """
    accum = train.global_batch // (train.micro_batch * world_size)
    if train.micro_batch * world_size * accum != train.global_batch:
        raise ValueError(
            f"train.global_batch={train.global_batch} is not micro_batch × world_size × grad_accum for world_size "
            f"{world_size}: {train.micro_batch} × {world_size} × {accum} = {train.micro_batch * world_size * accum}"
        )
    config: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": use_gpu,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": use_gpu},
        "communication_data_type": "fp32",
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own one-line progress log replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config
