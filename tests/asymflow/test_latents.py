"""Latents as training caches them (spec §7): a posterior *sample* seeded per sample key, and what that does to s."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2

from asymflow.latents import LATENT_PATCH, encode_latents, posterior_seed
from asymflow.oklab import oklab_encode
from asymflow.patching import pack, patchify, patchify_grid
from asymflow.subspace import ProcrustesFit
from data_prep.corpus import BASE_PHOTOS, photo_crop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vae():
    """The bundled base's trained VAE (a random VAE's posterior would not be a realistic variance)."""
    return AutoencoderKLFlux2.from_pretrained(REPO / "assets" / "tiny_base" / "vae").eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The base's 20 photos at 64², RGB in [−1,1]."""
    arr = np.stack([photo_crop(name, 64) for name in BASE_PHOTOS])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def _normalised_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the posterior in the normalised 2×2-packed grid: (μ − m_bn)/s_bn and σ/s_bn."""
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    mean, std = patchify_grid(dist.mode(), LATENT_PATCH), patchify_grid(dist.std, LATENT_PATCH)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (mean - bn_mean) / bn_std, std / bn_std


def test_posterior_seed_is_a_stable_function_of_the_key():
    assert posterior_seed("000123") == posterior_seed("000123")
    assert posterior_seed("000123") != posterior_seed("000124")
    assert posterior_seed("000123", seed=1) != posterior_seed("000123")
    assert 0 <= posterior_seed("x") < 2**63


def test_sample_is_mode_plus_seeded_posterior_noise(vae, photos):
    images = photos[:3]
    mode = encode_latents(vae, images, "mode")
    mean, std = _normalised_posterior(vae, images)
    torch.testing.assert_close(mode, mean, rtol=0, atol=1e-5)
    seeds = [posterior_seed(f"k{i}") for i in range(3)]
    sample = encode_latents(vae, images, "sample", seeds)
    # n_i = N(0, I) from the image's own seed, drawn at the VAE's latent shape and packed like the mean.
    noise = torch.stack([torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(sample, mean + std * patchify_grid(noise, LATENT_PATCH), rtol=0, atol=1e-5)
    # Reproducible, and independent of the batch an image is encoded in.
    assert torch.equal(encode_latents(vae, images, "sample", seeds), sample)
    alone = encode_latents(vae, images[2:], "sample", seeds[2:])
    torch.testing.assert_close(alone[0], sample[2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one seed per image"):
        encode_latents(vae, images, "sample", seeds[:2])


def test_sampled_latent_energy_includes_the_posterior_variance_and_lowers_s(vae, photos):
    """E_z(sample) = E_z(mode) + Σσ² in expectation (spec §4.2's s = sqrt(tr(BᵀGB)/E_z) therefore shrinks).

    One draw's deviation from that expectation is 2Σμσn + Σσ²(n² − 1), whose variance 4Σμ²σ² + 2Σσ⁴ bounds it.
    """
    seeds = [posterior_seed(name) for name in BASE_PHOTOS]
    mode = encode_latents(vae, photos, "mode")
    sample = encode_latents(vae, photos, "sample", seeds)
    mean, std = _normalised_posterior(vae, photos)
    e_mode, e_sample = float((mode.double() ** 2).sum()), float((sample.double() ** 2).sum())
    var = std.double() ** 2
    expected = e_mode + float(var.sum())
    spread = float(torch.sqrt(4 * (mean.double() ** 2 * var).sum() + 2 * (var**2).sum()))
    assert float(var.sum()) > 10 * spread  # the posterior variance is large enough for the test to see it
    assert abs(e_sample - expected) < 5 * spread

    pixels = patchify(oklab_encode(photos), 16).reshape(-1, 768)
    fits = {}
    for name, latents in (("mode", mode), ("sample", sample)):
        fit = ProcrustesFit()
        fit.update(pack(latents).reshape(-1, 128), pixels)
        fits[name] = fit.solve()[1]
    assert fits["sample"] < fits["mode"]
