"""Tiny family sources for the pipeline and `asymflow sample` tests: a diffusers pipeline directory of the family (the
real pipeline class's save_pretrained) and a 'trained' AsymFlow adapter exported for it."""
from __future__ import annotations

from pathlib import Path

import torch

from asymflow.families import get_family

FAMILIES = ("flux1", "sd3", "qwen_image", "sana")


def image_side(name: str) -> int:
    """A 2×2 grid of pixel patches: 32 px (Sana: 64 px, its patch is 32)."""
    return 2 * get_family(name).pixel_patch


def save_tiny_base(name: str, path: Path, seed: int = 0) -> Path:
    """The family's tiny diffusers pipeline directory. FLUX.1 through families.load.save_tiny_family_pipeline; SD3,
    Qwen-Image and Sana are built here with their diffusers pipeline classes and released scheduler settings (another
    branch adds them to save_tiny_family_pipeline; then this becomes that one call)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        SanaPipeline,
        StableDiffusion3Pipeline,
    )

    from asymflow.families.load import save_tiny_family_pipeline
    from asymflow.families.tiny import build_tiny_family_transformer, build_tiny_family_vae
    from asymflow.families.tiny_text import build_tiny_text_components

    if name == "flux1":
        return save_tiny_family_pipeline(name, path, seed)
    parts = dict(transformer=build_tiny_family_transformer(name, seed), vae=build_tiny_family_vae(name, seed),
                 **build_tiny_text_components(name, seed))
    if name == "sd3":
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)
    elif name == "qwen_image":
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                                    base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5,
                                                    max_shift=0.9, shift_terminal=0.02)
        pipe = QwenImagePipeline(scheduler=scheduler, **parts)
    elif name == "sana":
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
        pipe = SanaPipeline(scheduler=scheduler, **parts)
    else:
        raise ValueError(f"no tiny base for {name!r}")
    pipe.save_pretrained(str(path))
    return Path(path)


def random_subspace(name: str, seed: int = 0) -> tuple[torch.Tensor, float]:
    """An orthonormal B [3·p², r] (QR of a Gaussian) and s = 0.6: any such pair is a valid conversion."""
    family = get_family(name)
    gauss = torch.randn(family.pixel_dim, family.latent_dim, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    return torch.linalg.qr(gauss).Q.float(), 0.6


def export_trained_adapter(name: str, latent: torch.nn.Module, out: Path) -> Path:
    """Convert `latent`, add the family's LoRA, move every trainable tensor (a stand-in for training: lora_B ≠ 0,
    full modules changed) and export it with export_family_adapter."""
    from asymflow.families.adapter import export_family_adapter
    from asymflow.families.conversion import convert_family_transformer
    from asymflow.trainable import LoRASettings, apply_trainable

    family = get_family(name)
    basis, scale = random_subspace(name)
    student = apply_trainable(convert_family_transformer(family, latent, basis, scale), "lora",
                              LoRASettings(rank=4, alpha=8.0, targets=family.lora_targets), family.full_modules)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return export_family_adapter(student.eval(), out)
