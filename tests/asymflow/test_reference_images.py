"""Reference images (spec §5.4) on the bundled trained base: with the reference given in pixels as unpatchify(s·B·z_ref),
the converted model at initialisation computes x̂_0 = s·B·(the latent model's x̂_0 conditioned on z_ref), the latent
model's reference tokens carrying diffusers' own FLUX.2 klein image ids (time coordinate 10·(i+1))."""
from __future__ import annotations

import functools

import pytest
import torch
from diffusers import Flux2KleinPipeline

from asymflow.components import BaseModelConfig, load_base_components
from asymflow.convert import convert_transformer
from asymflow.parameterisation import calibrate
from asymflow.patching import condition_position_ids, image_position_ids, patchify, text_position_ids, unpatchify
from asymflow.pipeline import sample_images
from asymflow.scheduler import FlowAdapterScheduler
from tests.asymflow.helpers import random_basis
from tests.asymflow.test_convert import single_thread  # noqa: F401  (autouse fixture)

SCALE = 1.7
GRIDS = ((8, 8), (4, 6))  # two references of different sizes (token grids), after a 6×8-token target


@pytest.fixture(scope="module")
def models():
    """(latent, pixel) in fp64, so the identity holds to ~1e-12 instead of fp32 rounding."""
    latent = load_base_components(BaseModelConfig(kind="bundled"), ("transformer",)).transformer.double()
    pixel = convert_transformer(latent, random_basis(seed=4), SCALE).eval()
    return latent, pixel


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 6 * 16, 8 * 16, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.35, 0.9], dtype=torch.float64)
    text = torch.randn(2, 32, 96, generator=gen, dtype=torch.float64)
    z_refs = [torch.randn(1, h * w, 128, generator=gen, dtype=torch.float64) for h, w in GRIDS]
    return x_t, sigma, text, z_refs


def _latent_x0(latent, y_z, sigma_cal, text, z_refs, ref_ids):
    """ẑ_0 = y_z − σ̃·G([y_z, z_ref…], σ̃) with the reference outputs dropped, as Flux2KleinPipeline does."""
    hidden = torch.cat([y_z, *(z.expand(y_z.shape[0], -1, -1) for z in z_refs)], dim=1)
    ids = torch.cat([image_position_ids(6, 8).double(), ref_ids])
    u = latent(hidden_states=hidden, encoder_hidden_states=text, timestep=sigma_cal, img_ids=ids,
               txt_ids=text_position_ids(text.shape[1]), return_dict=False)[0][:, : y_z.shape[1]]
    return y_z - sigma_cal.view(-1, 1, 1) * u


def test_condition_ids_are_diffusers_klein_image_ids() -> None:
    grids = [torch.zeros(1, 128, h, w) for h, w in GRIDS]
    expected = Flux2KleinPipeline._prepare_image_ids(grids)[0]  # (1, ΣN, 4): t = 10 + 10·i
    ours = torch.cat([condition_position_ids(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    assert torch.equal(ours, expected.to(ours.dtype))


def test_reference_images_keep_the_conversion_identity(models) -> None:
    latent, pixel = models
    basis, scale = pixel.proj_buffer, pixel.scale_buffer
    x_t, sigma, text, z_refs = _inputs()
    # The reference in pixels: s·B·z_ref per token, unpatchified (normalised Oklab, the model's pixel space).
    refs = [unpatchify(SCALE * z @ basis.T, 16, h * 16, w * 16) for z, (h, w) in zip(z_refs, GRIDS)]

    with torch.no_grad():
        x0_pix = pixel(x_t, sigma, text, prediction="x0", condition_images=refs)
        k, sigma_cal = calibrate(sigma, scale)
        y_z = k.view(-1, 1, 1) * patchify(x_t, 16) @ basis  # Bᵀ·k·x_t per token
        ref_ids = Flux2KleinPipeline._prepare_image_ids([z.new_zeros(1, 128, h, w) for z, (h, w) in
                                                         zip(z_refs, GRIDS)])[0].double()
        z0 = _latent_x0(latent, y_z, sigma_cal, text, z_refs, ref_ids)
        expected = unpatchify(SCALE * z0 @ basis.T, 16, x_t.shape[2], x_t.shape[3])
        torch.testing.assert_close(x0_pix, expected, rtol=1e-10, atol=1e-10)

        # The conditioning is real: without the references, or with both at time offset 10, the output moves.
        unconditioned = pixel(x_t, sigma, text, prediction="x0")
        assert (unconditioned - x0_pix).abs().max() > 1e-3
        same_time = torch.cat([condition_position_ids(h, w, 0) for h, w in GRIDS]).double()
        z0_wrong = _latent_x0(latent, y_z, sigma_cal, text, z_refs, same_time)
        assert (unpatchify(SCALE * z0_wrong @ basis.T, 16, 96, 128) - x0_pix).abs().max() > 1e-3
        # The velocity form is the same model: û = (x_t − x̂_0)/σ.
        u = pixel(x_t, sigma, text, condition_images=refs)
        torch.testing.assert_close(u, (x_t - x0_pix) / sigma.view(-1, 1, 1, 1), rtol=1e-9, atol=1e-9)


def test_condition_images_are_checked(models) -> None:
    _, pixel = models
    x_t, sigma, text, _ = _inputs()
    with pytest.raises(ValueError, match="condition image 0"):
        pixel(x_t, sigma, text, condition_images=[torch.zeros(3, 3, 32, 32, dtype=torch.float64)])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        pixel(x_t, sigma, text, condition_images=[torch.zeros(1, 3, 40, 32, dtype=torch.float64)])


def test_sampling_with_references_is_sB_of_the_latent_sample(models) -> None:
    """Spec §5.3 invariant 7 with references: Euler on the pixel grid warp(τ; s) from ε, conditioned on
    unpatchify(s·B·z_ref), ends at s·B·(latent Euler on τ from Bᵀε conditioned on z_ref); the pixel sample is kept
    in fp32 by the sampling loop, so the two agree to fp32 rounding, not 1e-10."""
    latent, pixel = models
    basis = pixel.proj_buffer
    _, _, text, z_refs = _inputs()
    refs = [unpatchify(SCALE * z @ basis.T, 16, h * 16, w * 16) for z, (h, w) in zip(z_refs, GRIDS)]
    steps, (h, w) = 4, (6, 8)
    eps = torch.randn(2, 3, h * 16, w * 16, generator=torch.Generator().manual_seed(3))
    x = sample_images(functools.partial(pixel, condition_images=refs), text, None, height=h * 16, width=w * 16,
                      num_inference_steps=steps, guidance_scale=1.0, clamp_denoised=False, noise=eps, decode=False,
                      scheduler=FlowAdapterScheduler(solver="euler", shift=SCALE))

    ref_ids = torch.cat([condition_position_ids(gh, gw, i) for i, (gh, gw) in enumerate(GRIDS)]).double()
    z = patchify(eps.double(), 16) @ basis  # Bᵀε
    tau = torch.linspace(1, 0, steps + 1, dtype=torch.float64)  # the calibrated pixel grid is τ itself
    with torch.no_grad():
        for i in range(steps):
            z0 = _latent_x0(latent, z, tau[i].expand(2), text, z_refs, ref_ids)
            z = z + (tau[i + 1] - tau[i]) * (z - z0) / tau[i]  # Euler with u = (z − ẑ_0)/σ
    expected = unpatchify(SCALE * z @ basis.T, 16, h * 16, w * 16)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
