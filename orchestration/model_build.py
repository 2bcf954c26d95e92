"""The trainer's models from the run config: the converted pixel student (trainable set applied) and its teacher.

One function so the worker and the memory benchmark build exactly the same thing. Host memory is the constraint at
klein sizes (every rank builds before ZeRO-3 partitions): the base is loaded in its load dtype, the conversion takes
over its tensors instead of copying them, and under LoRA the teacher is tied to the student (asymflow.teacher), so
the peak is about one model in its load dtype plus the re-projected x_embedder/proj_out.
"""
from __future__ import annotations

import torch

from orchestration.config import RunConfig


def build_student_and_teacher(
    cfg: RunConfig, basis: torch.Tensor, scale: float | torch.Tensor, lora_seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student in train mode with its trainable set, frozen teacher of the converted init), both on the CPU.

    `lora_seed` seeds the LoRA initialisation (identical on every rank and every attempt).
    """
    from asymflow.components import load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.teacher import make_teacher
    from asymflow.trainable import apply_trainable

    latent = load_base_components(cfg.model, ("transformer",)).transformer
    # share_weights: the latent model is dropped right here, so the pixel model may own its tensors outright.
    student = convert_transformer(latent, basis, scale, share_weights=True)
    del latent
    teacher = make_teacher(student, cfg.trainable.teacher_kind(), cfg.trainable.full_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed)
        apply_trainable(student, cfg.trainable.mode, cfg.trainable.lora, cfg.trainable.full_modules)
    student.train()
    if cfg.train.activation_checkpointing:
        student.enable_gradient_checkpointing()
    return student, teacher
