"""The trainer's models from the run config: the converted pixel student (trainable set applied) and its teacher.

One function so the worker and the memory benchmark build exactly the same thing. Host memory is the constraint at
klein sizes (every rank builds before ZeRO-3 partitions): the base is loaded in its load dtype, the conversion takes
over its tensors instead of copying them, and under LoRA the teacher is tied to the student (asymflow.teacher), so
the peak is about one model in its load dtype plus the re-projected x_embedder/proj_out.

FLUX.2 converts through asymflow.convert; every other family of the registry (asymflow.families) loads its latent
transformer from the pipeline directory's transformer/ and converts by the family's weight surgery
(families.conversion), the same fit-free conversion with the subspace artifact's B and s.
"""
from __future__ import annotations

import torch

from asymflow.components import DTYPES, TRAINING_FAMILY
from orchestration.config import RunConfig


def convert_base(cfg: RunConfig, basis: torch.Tensor, scale: float | torch.Tensor,
                 share_weights: bool = False) -> torch.nn.Module:
    """The run's base latent transformer converted to its pixel model with (B, s), before any trainable set."""
    family = cfg.family()
    if family == TRAINING_FAMILY:
        from asymflow.components import load_base_components
        from asymflow.convert import convert_transformer

        latent = load_base_components(cfg.model, ("transformer",)).transformer
        return convert_transformer(latent, basis, scale, share_weights=share_weights)
    from pathlib import Path

    from asymflow.families import get_family
    from asymflow.families.conversion import convert_family_transformer

    # A path is loaded by the conversion itself, which then owns the tensors (no copy), as share_weights does here.
    transformer = str(Path(cfg.model.path).expanduser() / "transformer")
    model = convert_family_transformer(get_family(family), transformer, basis, scale,
                                       torch_dtype=DTYPES[cfg.model.dtype])
    return model.eval().requires_grad_(False)  # as load_base_components hands FLUX.2's base over


def training_guidance(cfg: RunConfig, model: torch.nn.Module) -> float | None:
    """The guidance value the step gives student and teacher: train.guidance, else the family's sampler default, for a
    guidance-distilled model of a non-FLUX.2 family (config guidance_embeds, FLUX.1-dev); None for every other model
    and for FLUX.2, whose step is unchanged. ValueError when
    train.guidance is set for a model that has no guidance embedding."""
    inner = getattr(model, "module", model)
    if cfg.family() == TRAINING_FAMILY:
        return None  # FLUX.2's step never passed one (the config refuses train.guidance for it)
    if not getattr(inner.config, "guidance_embeds", False):
        if cfg.train.guidance is not None:
            raise ValueError(f"train.guidance={cfg.train.guidance} is set, but the model has no guidance embedding "
                             "(its transformer config has no guidance_embeds: true); leave train.guidance unset")
        return None
    if cfg.train.guidance is not None:
        return cfg.train.guidance
    from asymflow.families import get_family

    sampler = get_family(cfg.family()).sampler
    if sampler is None or sampler.embedded_guidance is None:
        raise ValueError(f"the {cfg.family()} model is guidance-distilled but its family has no default guidance: "
                         "set train.guidance")
    return sampler.embedded_guidance


def build_student_and_teacher(
    cfg: RunConfig, basis: torch.Tensor, scale: float | torch.Tensor, lora_seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student in train mode with its trainable set, frozen teacher of the converted init), both on the CPU.

    `lora_seed` seeds the LoRA initialisation (identical on every rank and every attempt).
    """
    from asymflow.teacher import make_teacher
    from asymflow.trainable import apply_trainable

    # share_weights: the latent model is dropped right here, so the pixel model may own its tensors outright.
    student = convert_base(cfg, basis, scale, share_weights=True)
    teacher = make_teacher(student, cfg.trainable.teacher_kind(), cfg.trainable.full_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed)
        apply_trainable(student, cfg.trainable.mode, cfg.trainable.lora, cfg.trainable.full_modules)
    student.train()
    if cfg.train.activation_checkpointing:
        student.enable_gradient_checkpointing()
    return student, teacher
