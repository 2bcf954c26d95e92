"""What is trained (spec §9): LoRA targets, freezing, optimiser parameter groups and the shared-base teacher."""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

# FLUX.2 module names (diffusers Flux2Transformer2DModel), valid for any number of blocks.
FLUX2_LORA_TARGETS: tuple[str, ...] = (
    r"transformer_blocks\.\d+\.ff\.linear_(in|out)",
    r"transformer_blocks\.\d+\.ff_context\.linear_(in|out)",
    r"time_guidance_embed\.timestep_embedder\.linear_[12]",
    r"single_transformer_blocks\.\d+\.attn\.to_out",  # fused attention + MLP output projection
)
FULL_MODULES: tuple[str, ...] = ("x_embedder", "proj_out", "norm_out")


class LoRASettings(BaseModel):
    """LoRA of the AsymFLUX.2 recipe: rank 256, alpha 256 (scale 1), dropout 0.05, PEFT Gaussian init."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(256, gt=0)
    alpha: float = Field(256.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: tuple[str, ...] = FLUX2_LORA_TARGETS

    def target_regex(self) -> str:
        """One regex for PEFT, which full-matches it against every module name."""
        return "|".join(f"(?:{t})" for t in self.targets)


def in_module(name: str, module: str) -> bool:
    """True if the dotted parameter name lies inside the module at the exact dotted path `module`, counted from the
    model's root ("proj_out" is the top-level output projection, not FLUX.1's single_transformer_blocks.N.proj_out;
    "pos_embed.proj" is that one submodule). A name equal to `module` is a parameter at that path (Sana's
    scale_shift_table)."""
    return name == module or name.startswith(f"{module}.")


def has_adapter(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def apply_trainable(
    model: torch.nn.Module,
    mode: Literal["lora", "full"] = "lora",
    lora: LoRASettings | None = None,
    full_modules: Sequence[str] = FULL_MODULES,
    upcast_trainable: bool = True,
) -> torch.nn.Module:
    """Set requires_grad for the spec §9 trainable set, in place; returns the model.

    "lora": freeze everything, attach a PEFT LoRA adapter named "default" (diffusers `add_adapter`) on
    `lora.targets`, then unfreeze `full_modules` in full. "full": every parameter is trainable, no LoRA.
    `upcast_trainable` keeps trainable tensors in fp32 (the frozen base may be bf16; run under autocast).
    Build the teacher (`build_teacher`) BEFORE calling this: it must not copy the adapter.
    """
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig

        lora = lora or LoRASettings()
        if has_adapter(model):
            raise ValueError("model already carries a LoRA adapter; apply_trainable must run once per model")
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_regex(),
                init_lora_weights="gaussian",
            ),
            adapter_name="default",
        )
        for module in full_modules:
            found = [p for name, p in model.named_parameters() if in_module(name, module)]
            if not found:
                raise ValueError(f"full-trainable module {module!r} has no parameters in {type(model).__name__}")
            for p in found:
                p.requires_grad_(True)
    else:
        raise ValueError(f"unknown trainable mode {mode!r}; expected 'lora' or 'full'")
    if upcast_trainable:
        from diffusers.training_utils import cast_training_params

        cast_training_params(model, dtype=torch.float32)
    return model


def why_trained(
    module: str, mode: Literal["lora", "full"], lora: LoRASettings | None, full_modules: Sequence[str]
) -> str | None:
    """Which setting makes `apply_trainable` train (or adapt) the module at dotted path `module`; None if it stays
    frozen. PEFT full-matches a string target against module names, as here."""
    if mode == "full":
        return "trainable.mode is 'full'"
    covering = [m for m in full_modules if in_module(f"{module}.weight", m)]
    if covering:
        return f"trainable.full_modules includes {covering[0]!r}"
    if re.fullmatch((lora or LoRASettings()).target_regex(), module):
        return "a trainable.lora.targets pattern matches it"
    return None


def param_groups(
    model: torch.nn.Module,
    lr: float,
    lr_multipliers: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimiser groups of the trainable parameters: one per multiplier key (lr·mult) plus "default" (lr).

    A parameter belongs to the first key that is the dotted path, from the root, of a module holding it (default
    {"proj_out": 10.0}, spec §9; FLUX.1's single_transformer_blocks.N.proj_out is not "proj_out").
    Empty groups are dropped; every group carries "name", "params", "lr", "weight_decay".
    """
    multipliers = {"proj_out": 10.0} if lr_multipliers is None else dict(lr_multipliers)
    buckets: dict[str, list[torch.nn.Parameter]] = {key: [] for key in multipliers}
    buckets["default"] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in multipliers if in_module(name, k)), "default")
        buckets[key].append(p)
    return [
        {"name": key, "params": params, "lr": lr * multipliers.get(key, 1.0), "weight_decay": weight_decay}
        for key, params in buckets.items()
        if params
    ]


def build_teacher(
    student: torch.nn.Module, share_base: bool = True, own_modules: Sequence[str] = FULL_MODULES
) -> torch.nn.Module:
    """Frozen eval-mode teacher = the converted init (spec §8 step 4, §9).

    share_base=True: a module-tree copy whose Parameters outside `own_modules` ARE the student's (same
    tensor objects, no memory), while x_embedder/proj_out/norm_out get their own frozen copies. Call it on
    the freshly converted student BEFORE `apply_trainable`: the student's base stays frozen and its later
    LoRA wraps the same base Parameters, so the teacher keeps computing the converted init.
    Sharing freezes those base Parameters on the student too (requires_grad=False), so it cannot be combined
    with `apply_trainable(mode="full")`.
    share_base=False: a fully independent copy (needed when the student is partitioned, e.g. DeepSpeed ZeRO-3,
    or fully trained). Buffers (proj_buffer, scale_buffer) are always copied.
    """
    if has_adapter(student):
        raise ValueError("build_teacher must be called before LoRA is attached to the student (apply_trainable)")
    memo: dict[int, object] = {}
    if share_base:
        frozen_shared = [(n, p) for n, p in student.named_parameters() if not any(in_module(n, m) for m in own_modules)]
        for _, p in frozen_shared:
            p.requires_grad_(False)  # sharing is sound only while the student never updates these
        memo = {id(p): p for _, p in frozen_shared}  # deepcopy returns these objects themselves
    teacher = copy.deepcopy(student, memo)
    teacher.requires_grad_(False)
    return teacher.eval()


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + all buffers, detached (what checkpoints and the EMA track, spec §9)."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach() for name, b in model.named_buffers()})
    return state
