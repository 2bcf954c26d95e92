"""Sampling a converted pixel model of a non-FLUX.2 family with that family's own sampler defaults and CFG (issue 15).

Input is text conditioning as tensors in the family's own form (`asymflow.families.text.encode_family_prompts` makes
them as the family's diffusers pipeline does, `sampling_inputs` passes them here; no pipeline class or `asymflow sample`
wiring yet):
  FLUX.1:     T5 states [B,L,4096] + pooled_projections (CLIP pooled) [B,768]; a guidance-distilled model (dev)
              also takes the guidance value, which the sampler passes (`embedded_guidance`); true CFG off by default.
  SD3 / 3.5:  joint states [B,L,4096] + pooled_projections [B,2048]; true CFG with the negative prompt's pair.
  Qwen-Image: states [B,L,3584] + encoder_hidden_states_mask [B,L]; true CFG renormalised per token.
  Sana:       states [B,L,2304] + encoder_attention_mask [B,L]; true CFG.
The defaults (steps, shift rule and σ grid, guidance) are the family's `ModelFamily.sampler` (from its diffusers
pipeline, cited there). The integrator is Euler, x ← x + (σ_{i+1} − σ_i)·û, as FlowMatchEulerDiscreteScheduler
steps (Sana's own pipeline uses DPM-Solver++ on the same grid).

Guidance acts on the backbone's output û_a (the pixel model's "latent-like" velocity, spec §3.4) before the
recovery: true CFG is affine, so it is the same CFG on û or x̂_0; Qwen-Image's per-token renormalisation is not, and
on û_a it is exactly the latent pipeline's (at init û_a = B·G with orthonormal B, so per-token norms are G's).
Proven (tests/asymflow/test_families_sampling.py): at init, with the pixel grid σ_i, the sample from pixel noise ε
equals s·B·(the latent model's Euler sample on σ̃_i = warp(σ_i; 1/s) from latent noise k(σ_0)·Bᵀε (= Bᵀε when
σ_0 = 1), with the diffusers
pipeline's CFG formula) — Euler is the DDIM update x_{i+1} = (1−σ_{i+1})x̂_0 + σ_{i+1}ε̂, and the calibration
y = k·Bᵀx, σ̃ = kσ maps one DDIM step onto the other while P⊥x = σ·P⊥ε vanishes at σ = 0.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asymflow.oklab import oklab_decode
from asymflow.scheduler import FlowAdapterScheduler
from asymflow.timesteps import resolve_shift, warp

from .core import SamplerDefaults
from .pixel import AsymFlowPixelMixin

TRAIN_TIMESTEPS = 1000  # the flow schedulers' num_train_timesteps (the ends of SD3's and Sana's grids)


def family_sigmas(defaults: SamplerDefaults, steps: int, seq_len: int, dtype: torch.dtype = torch.float64
                  ) -> torch.Tensor:
    """The family's σ grid [n] (no final 0) for n = steps at `seq_len` image tokens (see `SamplerDefaults`)."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    shift = resolve_shift(defaults.shift, seq_len)
    ramp = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if defaults.grid == "linspace":
        tau = ramp
    elif defaults.grid == "train_range":
        tau = torch.linspace(1.0, float(warp(1.0 / TRAIN_TIMESTEPS, shift)), steps, dtype=torch.float64)
    elif defaults.grid == "dpm_flow":
        tau = (1.0 - 1.0 / TRAIN_TIMESTEPS) * ramp
    else:
        raise ValueError(f"unknown sigma grid {defaults.grid!r}")
    sigmas = warp(tau, shift)
    if defaults.shift_terminal is not None:  # FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - defaults.shift_terminal))
    return sigmas.to(dtype)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm: bool) -> torch.Tensor:
    """True CFG uncond + w·(cond − uncond) on tokens [B,N,D]; with `renorm` rescaled per token to cond's norm."""
    guided = uncond + scale * (cond - uncond)
    if renorm:
        guided = guided * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                           / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
    return guided


@torch.no_grad()
def sample_family(
    model: AsymFlowPixelMixin,
    prompt_embeds: torch.Tensor,
    conditioning: Mapping[str, Any] | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_conditioning: Mapping[str, Any] | None = None,
    *,
    height: int,
    width: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    embedded_guidance: float | None = None,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """Sample images [B,3,H,W] from a family's pixel model (see the module docstring).

    prompt_embeds [B,L,D] with `conditioning` (the family's other forward inputs: pooled_projections, a text mask,
    ...); negative_prompt_embeds / negative_conditioning in the same form, needed when guidance_scale ≠ 1.
    Defaults from `model.family().sampler`: steps, guidance_scale (true CFG), embedded_guidance (FLUX.1-dev's
    guidance input; ignored by a model without a guidance embedding) and the σ grid at H·W/p² tokens (`sigmas`
    replaces it). Noise: `noise` [B,3,H,W], else N(0, 1) from torch.Generator().manual_seed(seed) on the CPU, in the
    model's algebra dtype (fp64 for an fp64 model, else fp32). Returns images in [−1,1] (Oklab-decoded), or the
    final normalised-Oklab sample with decode=False.
    """
    if not isinstance(model, AsymFlowPixelMixin):
        raise TypeError(f"model must be a family's pixel model (families.pixel.AsymFlowPixelMixin), got "
                        f"{type(model).__name__}; FLUX.2 samples with asymflow.pipeline")
    family = model.family()
    defaults = family.sampler
    if defaults is None:
        raise ValueError(f"family {family.name!r} samples with asymflow.pipeline, not families.sampling")
    p = model.config.patch_size
    if height % p or width % p or height <= 0 or width <= 0:
        raise ValueError(f"height={height} and width={width} must be positive multiples of the pixel patch {p}")
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [B,L,D], got {tuple(prompt_embeds.shape)}")
    batch = prompt_embeds.shape[0]
    steps = defaults.steps if num_inference_steps is None else num_inference_steps
    scale = defaults.cfg_scale if guidance_scale is None else guidance_scale
    if scale != 1.0 and negative_prompt_embeds is None:
        raise ValueError(f"guidance_scale={scale} ({family.title}'s true CFG) needs negative_prompt_embeds")
    conditioning, negative_conditioning = dict(conditioning or {}), dict(negative_conditioning or {})
    if getattr(model.config, "guidance_embeds", False):
        value = defaults.embedded_guidance if embedded_guidance is None else embedded_guidance
        for extra in (conditioning, negative_conditioning):
            extra.setdefault("guidance", torch.full((batch,), float(value), device=prompt_embeds.device))

    dtype = torch.float64 if model.proj_buffer.dtype == torch.float64 else torch.float32
    shape = (batch, 3, height, width)
    if noise is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        noise = torch.randn(shape, generator=generator, dtype=dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    x = noise.to(device=prompt_embeds.device, dtype=dtype)
    grid = family_sigmas(defaults, steps, (height // p) * (width // p)) if sigmas is None else sigmas
    scheduler = FlowAdapterScheduler(solver="euler")
    scheduler.set_timesteps(sigmas=grid)

    for i in range(len(scheduler.timesteps)):
        sigma = torch.full((batch,), float(scheduler.sigmas[i]), dtype=dtype, device=x.device)
        tokens, sigma, k, sigma_cal = model._calibrated_tokens(x, sigma, "velocity")
        grid_hw = (height // p, width // p)

        def backbone(text: torch.Tensor, extra: Mapping[str, Any]) -> torch.Tensor:
            return model._backbone(k.view(batch, 1, 1) * tokens, sigma_cal, text, grid_hw, **extra).to(dtype)

        u_a = backbone(prompt_embeds, conditioning)
        if scale != 1.0:
            u_a = combine_guidance(u_a, backbone(negative_prompt_embeds, negative_conditioning), scale,
                                   defaults.cfg_renorm)
        u = model._recovered_image(u_a, tokens, sigma, "velocity", height, width)
        x = scheduler.step(u, i, x).prev_sample
    return oklab_decode(x).clamp(-1.0, 1.0) if decode else x


__all__ = ["combine_guidance", "family_sigmas", "sample_family"]
