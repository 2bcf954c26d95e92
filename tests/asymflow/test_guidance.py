"""Orthogonal CFG (spec §11.2, §14 #12) and clamp_denoised (spec §11.4) against closed-form answers."""
from __future__ import annotations

import pytest
import torch

from asymflow.guidance import clamp_denoised, orthogonal_guidance
from asymflow.oklab import M1, M2, OKLAB_MEAN, OKLAB_STD, oklab_decode, oklab_encode

SIGMAS = (0.05, 0.3, 0.77, 1.0)


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    u_c, u_u, x_t = (torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype) for _ in range(3))
    sigma = torch.tensor(SIGMAS[:batch], dtype=dtype)
    return u_c, u_u, x_t, sigma


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def test_full_strength_bias_is_orthogonal_to_the_conditional_x0() -> None:
    """γ = 1: Δ = u − u_c satisfies |⟨Δ, d⟩| < 1e-6·‖Δ‖‖d‖ per sample, d = x_t − σ·u_c."""
    u_c, u_u, x_t, sigma = _inputs()
    u = orthogonal_guidance(u_c, u_u, x_t, sigma, scale=4.0, strength=1.0)
    delta, d = u - u_c, x_t - sigma.view(-1, 1, 1, 1) * u_c
    bound = 1e-6 * delta.flatten(1).norm(dim=1) * d.flatten(1).norm(dim=1)
    assert (_per_sample_dot(delta, d).abs() < bound).all()
    assert (delta.flatten(1).norm(dim=1) > 0).all()  # the bias is not trivially zero


def test_partial_strength_keeps_a_fraction_of_the_parallel_part() -> None:
    """⟨Δ_γ, d⟩ = (1 − γ)·⟨Δ_0, d⟩: the projection is linear in γ."""
    u_c, u_u, x_t, sigma = _inputs(1)
    d = x_t - sigma.view(-1, 1, 1, 1) * u_c
    parallel_0 = _per_sample_dot(orthogonal_guidance(u_c, u_u, x_t, sigma, 3.0, 0.0) - u_c, d)
    parallel_g = _per_sample_dot(orthogonal_guidance(u_c, u_u, x_t, sigma, 3.0, 0.25) - u_c, d)
    torch.testing.assert_close(parallel_g, 0.75 * parallel_0, rtol=1e-10, atol=1e-10)


def test_zero_strength_is_standard_cfg() -> None:
    u_c, u_u, x_t, sigma = _inputs(2)
    u = orthogonal_guidance(u_c, u_u, x_t, sigma, scale=4.0, strength=0.0)
    torch.testing.assert_close(u, u_u + 4.0 * (u_c - u_u), rtol=0, atol=1e-12)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_unit_scale_returns_the_conditional_velocity(strength: float) -> None:
    u_c, u_u, x_t, sigma = _inputs(3)
    assert torch.equal(orthogonal_guidance(u_c, u_u, x_t, sigma, scale=1.0, strength=strength), u_c)


def test_projection_is_per_sample_and_scalar_sigma_broadcasts() -> None:
    u_c, u_u, x_t, _ = _inputs(4)
    full = orthogonal_guidance(u_c, u_u, x_t, 0.3, scale=4.0)
    alone = orthogonal_guidance(u_c[:1], u_u[:1], x_t[:1], 0.3, scale=4.0)
    torch.testing.assert_close(full[:1], alone, rtol=0, atol=1e-12)
    # d = 0 (x_t = σ·u_c) hits the 1e-6 floor instead of dividing by zero.
    safe = orthogonal_guidance(u_c, u_u, 0.3 * u_c, 0.3, scale=4.0)
    assert torch.isfinite(safe).all()
    with pytest.raises(ValueError, match="must match"):
        orthogonal_guidance(u_c, u_u[:, :2], x_t, 0.3, scale=4.0)


def _linear_light(x: torch.Tensor) -> torch.Tensor:
    """Normalised Oklab -> linear sRGB without the decoder's clamp, to see where a colour really lies."""
    lab = x * OKLAB_STD + torch.tensor(OKLAB_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    m1, m2 = torch.tensor(M1, dtype=x.dtype), torch.tensor(M2, dtype=x.dtype)
    lms = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m2), lab) ** 3
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m1), lms)


def _flow(x_0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = (1−σ)x_0 + σε and its exact velocity u = ε − x_0, one σ per sample."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x_0.shape, generator=g, dtype=x_0.dtype)
    sigma = torch.tensor(SIGMAS, dtype=x_0.dtype)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x_0 + s * eps, eps - x_0, sigma


def test_clamp_denoised_leaves_an_in_gamut_prediction_unchanged() -> None:
    g = torch.Generator().manual_seed(5)
    img = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 1.8 - 0.9  # strictly inside the gamut
    x_t, u, sigma = _flow(oklab_encode(img), seed=6)
    # fp64 round trip error ~1e-13, amplified by 1/σ ≤ 20 in u.
    torch.testing.assert_close(clamp_denoised(u, x_t, sigma), u, rtol=0, atol=1e-9)


def test_clamp_denoised_pulls_an_out_of_gamut_prediction_into_the_gamut() -> None:
    g = torch.Generator().manual_seed(7)
    x_0 = 3.0 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)  # far outside sRGB
    lin = _linear_light(x_0)
    assert (lin < -0.05).any() and (lin > 1.05).any()
    x_t, u, sigma = _flow(x_0, seed=8)
    x0_new = x_t - sigma.view(-1, 1, 1, 1) * clamp_denoised(u, x_t, sigma)
    lin_new = _linear_light(x0_new)
    assert lin_new.min() > -1e-9 and lin_new.max() < 1 + 1e-9  # decodes inside [−1, 1] without clamping
    img = oklab_decode(x_0).clamp(-1, 1)
    torch.testing.assert_close(oklab_decode(x0_new), img, rtol=0, atol=1e-9)  # it is the clamped image


def test_clamp_denoised_keeps_the_velocity_dtype() -> None:
    x_t, u, sigma = _flow(torch.zeros(4, 3, 8, 8), seed=9)
    assert clamp_denoised(u, x_t, sigma).dtype == torch.float32
