"""Sampling the converted pixel model of FLUX.1, SD3, Qwen-Image and Sana with each family's CFG convention (issue 15):
at init the pixel sample equals the latent model's sample (its diffusers pipeline's CFG formula, Euler on the
calibrated grid) mapped through s·B; the σ grids are the diffusers schedulers' own."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as qwen_calculate_shift

from asymflow.families import get_family
from asymflow.families.conversion import convert_family_transformer
from asymflow.families.fit import fit_family_subspace
from asymflow.families.sampling import family_sigmas, sample_family
from asymflow.families.tiny import build_tiny_family_transformer, build_tiny_family_vae
from asymflow.parameterisation import calibrate
from asymflow.patching import patchify, unpatchify
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)
from tests.asymflow.test_families_convert import conditioning, image_size, latent_velocity, sample_images

FAMILIES = ("flux1", "sd3", "qwen_image", "sana")
STEPS = 3
CFG = 3.0  # true CFG scale used in the parity runs (≠ 1, so the formula matters)
EMBEDDED = 2.0  # FLUX.1-dev's guidance input in the parity runs (≠ the default 3.5)


def diffusers_sigmas(name: str, steps: int, seq_len: int) -> torch.Tensor:
    """The σ grid [n] the family's diffusers pipeline gets from its scheduler (released scheduler configs)."""
    if name in ("flux1", "qwen_image"):  # FluxPipeline / QwenImagePipeline: sigmas = linspace(1, 1/n, n), mu
        cfg = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        if name == "qwen_image":
            cfg.update(max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", **cfg)
        shift_fn = flux_calculate_shift if name == "flux1" else qwen_calculate_shift
        mu = shift_fn(seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    elif name == "sd3":  # StableDiffusion3Pipeline: set_timesteps(n) with the static shift 3
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
    else:  # SanaPipeline: DPM-Solver++ in flow mode, flow_shift 3
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
        scheduler.set_timesteps(steps)
    assert float(scheduler.sigmas[-1]) == 0.0
    return scheduler.sigmas[:-1].double()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("steps, seq_len", [(4, 1024), (28, 4096), (50, 300)])
def test_sigma_grid_is_the_pipelines(name: str, steps: int, seq_len: int) -> None:
    """family_sigmas = the σ the diffusers pipeline's scheduler hands the model (fp32 there: 1e-6)."""
    ours = family_sigmas(get_family(name).sampler, steps, seq_len)
    torch.testing.assert_close(ours, diffusers_sigmas(name, steps, seq_len), rtol=0, atol=2e-6)


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request):
    """(name, fp64 latent model, its fp64 pixel conversion with B, s fitted from the family's tiny VAE, B, s)."""
    name = request.param
    family = get_family(name)
    basis, scale = fit_family_subspace(family, build_tiny_family_vae(name), [sample_images()])
    latent = build_tiny_family_transformer(name).to(torch.float64)
    pixel = convert_family_transformer(family, latent, basis, scale).eval()
    assert pixel.proj_buffer.dtype == torch.float64
    return name, latent, pixel, basis, scale


def prompts(name: str) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    """Conditional and negative conditioning (batch 2; Qwen-Image/Sana: the second prompt masked shorter), fp64,
    without FLUX.1's guidance value: the sampler passes that."""
    text, extra = conditioning(name, 2, torch.float64, seed=1)
    neg_text, neg_extra = conditioning(name, 2, torch.float64, seed=2)
    extra.pop("guidance", None)
    neg_extra.pop("guidance", None)
    return text, extra, neg_text, neg_extra


@torch.no_grad()
def latent_reference(name, latent, basis, scale, noise, cfg_scale, embedded=None, renorm=None) -> torch.Tensor:
    """s·B·z as an image, z the latent model's Euler sample from k(σ_0)·Bᵀε on σ̃_i = warp(σ_i; 1/s), each step's
    velocity combined as the family's diffusers pipeline does (formulas written out here, not the sampler's)."""
    family = get_family(name)
    text, extra, neg_text, neg_extra = prompts(name)
    if name == "flux1":  # FluxPipeline: guidance = full([1], guidance_scale).expand(batch), same for both passes
        extra["guidance"] = neg_extra["guidance"] = torch.full((2,), embedded, dtype=torch.float64)
    renorm = name == "qwen_image" if renorm is None else renorm
    H, W = image_size(name)
    n_tokens = (H // family.pixel_patch) * (W // family.pixel_patch)
    sigmas = family_sigmas(family.sampler, STEPS, n_tokens)
    k, sigmas_cal = calibrate(sigmas, scale)
    grid = torch.cat([sigmas_cal, sigmas.new_zeros(1)])
    # The pixel sample a_0 = Bᵀε at σ_0 is the latent sample y_0 = k(σ_0)·a_0 at σ̃_0 (k = 1 where σ_0 = 1; Sana's
    # grid starts at 0.9997); channel-first latent tokens.
    z = k[0] * (patchify(noise, family.pixel_patch) @ basis)
    for i in range(STEPS):
        sigma = torch.full((2,), float(grid[i]), dtype=torch.float64)
        v = latent_velocity(name, latent, z, sigma, text, extra)
        if cfg_scale != 1.0:
            v_neg = latent_velocity(name, latent, z, sigma, neg_text, neg_extra)
            # SD3 pipeline_stable_diffusion_3.py, Sana pipeline_sana.py, FluxPipeline's true CFG:
            #   noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            guided = v_neg + cfg_scale * (v - v_neg)
            if renorm:  # QwenImagePipeline: comb_pred * (norm(noise_pred, dim=-1) / norm(comb_pred, dim=-1))
                guided = guided * (v.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
            v = guided
        z = z + (grid[i + 1] - grid[i]) * v
    return unpatchify(scale * z @ basis.T, family.pixel_patch, H, W)


def pixel_sample(name, pixel, noise, cfg_scale, embedded=None) -> torch.Tensor:
    text, extra, neg_text, neg_extra = prompts(name)
    H, W = image_size(name)
    return sample_family(pixel, text, extra, neg_text, neg_extra, height=H, width=W, num_inference_steps=STEPS,
                         guidance_scale=cfg_scale, embedded_guidance=embedded, noise=noise, decode=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_pixel_sample_at_init_is_the_latent_sample_through_sB(converted) -> None:
    """Exact up to fp64 rounding (each of the 3 steps is a few hundred fp64 operations through a network of O(1)
    Lipschitz constant: errors ~1e-14, bound 1e-10); guidance with scale ≠ 1 changes the sample by O(1), so a wrong
    CFG formula (or a missing renormalisation for Qwen-Image) fails by orders of magnitude."""
    name, latent, pixel, basis, scale = converted
    noise = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    embedded = EMBEDDED if name == "flux1" else None
    guided = pixel_sample(name, pixel, noise, CFG, embedded)
    expected = latent_reference(name, latent, basis, scale, noise, CFG, embedded)
    assert rel(guided, expected) < 1e-10
    assert rel(pixel_sample(name, pixel, noise, 1.0, embedded), expected) > 1e-3  # guidance matters
    if name == "qwen_image":  # plain CFG without the per-token renormalisation is a different sample
        assert rel(guided, latent_reference(name, latent, basis, scale, noise, CFG, renorm=False)) > 1e-3


def test_family_defaults_and_embedded_guidance(converted) -> None:
    """The registry's defaults drive the sampler: FLUX.1-dev takes its guidance value as input (3.5 by default, true
    CFG off so no negative is needed), the others run true CFG at their pipeline's scale."""
    name, latent, pixel, basis, scale = converted
    defaults = get_family(name).sampler
    noise = torch.randn(2, 3, *image_size(name), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    text, extra, neg_text, neg_extra = prompts(name)
    H, W = image_size(name)
    run = dict(height=H, width=W, num_inference_steps=STEPS, noise=noise, decode=False)
    if name == "flux1":
        assert defaults.cfg_scale == 1.0 and defaults.embedded_guidance == 3.5
        default = sample_family(pixel, text, extra, **run)
        assert rel(default, latent_reference(name, latent, basis, scale, noise, 1.0, 3.5)) < 1e-10
        assert rel(default, latent_reference(name, latent, basis, scale, noise, 1.0, EMBEDDED)) > 1e-6
    else:
        assert defaults.cfg_scale > 1.0
        with pytest.raises(ValueError, match="negative_prompt_embeds"):
            sample_family(pixel, text, extra, **run)
        default = sample_family(pixel, text, extra, neg_text, neg_extra, **run)
        assert rel(default, latent_reference(name, latent, basis, scale, noise, defaults.cfg_scale)) < 1e-10


def test_seeded_images(converted) -> None:
    """A seed gives the same images every time and another seed others; images are decoded into [−1, 1]."""
    name, _, pixel, _, _ = converted
    text, extra, neg_text, neg_extra = prompts(name)
    H, W = image_size(name)
    run = dict(height=H, width=W, num_inference_steps=2, guidance_scale=2.0)
    first = sample_family(pixel, text, extra, neg_text, neg_extra, seed=3, **run)
    assert first.shape == (2, 3, H, W) and first.abs().max() <= 1.0
    assert torch.equal(first, sample_family(pixel, text, extra, neg_text, neg_extra, seed=3, **run))
    assert not torch.equal(first, sample_family(pixel, text, extra, neg_text, neg_extra, seed=4, **run))
    with pytest.raises(ValueError, match="multiples of the pixel patch"):
        sample_family(pixel, text, extra, neg_text, neg_extra, seed=3, **{**run, "height": H + 1})
    with pytest.raises(TypeError, match="asymflow.pipeline"):  # a latent model is not a family's pixel model
        sample_family(build_tiny_family_transformer(name), text, extra, neg_text, neg_extra, seed=3, **run)
