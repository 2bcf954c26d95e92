"""Spec §14 #1–4: exact recovery, s = 1 and full-rank reductions, calibration identity; bad input."""
import math

import pytest
import torch

from asymflow import calibrate, recover_velocity, recover_x0
from asymflow.parameterisation import ideal_output, project
from tests.asymflow.helpers import flow_sample, random_basis

SIGMAS = [0.05, 0.3, 0.77, 1.0]
SCALES = [1.0, 0.7, 2.3]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("scale", SCALES)
def test_exact_recovery(sigma, scale):
    basis = random_basis()
    x_0, eps, x_t, sig = flow_sample(2, 4, 768, sigma)
    u_a = ideal_output(x_0, eps, basis, scale)
    u = recover_velocity(u_a, x_t, sig, basis, scale)
    assert (u - (eps - x_0)).abs().max() < 1e-10
    assert (recover_x0(u_a, x_t, sig, basis, scale) - x_0).abs().max() < 1e-10


@pytest.mark.parametrize("scale", SCALES)
def test_x0_form_agrees_with_velocity_form(scale):
    basis = random_basis(seed=3)
    g = torch.Generator().manual_seed(5)
    u_a = torch.randn(2, 3, 768, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 3, 768, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.2, 0.9], dtype=torch.float64)
    u = recover_velocity(u_a, x_t, sig, basis, scale)
    x0 = recover_x0(u_a, x_t, sig, basis, scale)
    assert (x_t - sig.view(-1, 1, 1) * u - x0).abs().max() < 1e-10


def test_scale_one_reduction():
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    k, sigma_cal = calibrate(sigma, 1.0)
    assert torch.equal(k, torch.ones(3, dtype=torch.float64))
    assert torch.equal(sigma_cal, sigma)
    basis = random_basis()
    x_0, eps, _, _ = flow_sample(1, 2, 768, 0.5)
    assert torch.allclose(ideal_output(x_0, eps, basis, 1.0), project(eps, basis) - x_0, atol=0, rtol=0)


def test_full_rank_and_rank_zero_reductions():
    g = torch.Generator().manual_seed(7)
    u_a = torch.randn(2, 3, 48, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 3, 48, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.4, 0.8], dtype=torch.float64)
    full = random_basis(48, 48, seed=1)
    assert (recover_velocity(u_a, x_t, sig, full, 1.0) - u_a).abs().max() < 1e-12
    empty = torch.zeros(48, 0, dtype=torch.float64)
    u = recover_velocity(u_a, x_t, sig, empty, 1.0)
    assert (x_t - sig.view(-1, 1, 1) * u + u_a).abs().max() < 1e-12  # x̂_0 = −û_a


@pytest.mark.parametrize("scale", SCALES)
def test_calibration_identity(scale):
    x_0, eps, x_t, _ = flow_sample(1, 2, 8, 0.0)
    for sigma in SIGMAS + [0.0]:
        k, sigma_cal = calibrate(torch.tensor(sigma, dtype=torch.float64), scale)
        x_t = (1 - sigma) * x_0 + sigma * eps
        assert (k * x_t - ((1 - sigma_cal) * x_0 / scale + sigma_cal * eps)).abs().max() < 1e-12
    k1, _ = calibrate(torch.tensor(1.0, dtype=torch.float64), scale)
    k0, _ = calibrate(torch.tensor(0.0, dtype=torch.float64), scale)
    assert math.isclose(k1.item(), 1.0) and math.isclose(k0.item(), 1 / scale)


def test_sigma_min_clamps_only_divisions():
    basis = random_basis(16, 4)
    u_a = torch.ones(1, 1, 16, dtype=torch.float64)
    x_t = torch.ones(1, 1, 16, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    u = recover_velocity(u_a, x_t, zero, basis, 2.0, sigma_min=1e-4)
    assert torch.isfinite(u).all()
    # complement part = (P⊥x_t + s·P⊥û_a) / σ_min
    comp = (x_t - project(x_t, basis)) * 3.0 / 1e-4
    assert torch.allclose(u - project(u, basis), comp)


def test_fp32_by_default_even_for_bf16_inputs():
    basis = random_basis(768, 128, dtype=torch.float32)
    x_0, eps, x_t, sig = flow_sample(1, 2, 768, 0.5, dtype=torch.float32)
    u = recover_velocity(ideal_output(x_0, eps, basis, 2.0).bfloat16(), x_t.bfloat16(), sig, basis, 2.0)
    assert u.dtype == torch.float32
    # fp32 algebra on bf16-rounded inputs: error dominated by bf16 rounding of inputs (~2^-8 relative)
    assert ((u - (eps - x_0)).abs().max() / (eps - x_0).abs().max()) < 3e-2


def test_bad_inputs_raise():
    basis = random_basis(768, 128)
    x_0, eps, x_t, sig = flow_sample(1, 2, 768, 0.5)
    u_a = ideal_output(x_0, eps, basis, 1.0)
    bad = x_t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_t"):
        recover_velocity(u_a, bad, sig, basis, 1.0)
    inf_u = u_a.clone()
    inf_u[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="u_a"):
        recover_velocity(inf_u, x_t, sig, basis, 1.0)
    with pytest.raises(ValueError, match="not orthonormal"):
        recover_velocity(u_a, x_t, sig, basis * 1.1, 1.0)
    with pytest.raises(ValueError, match="does not match token dim"):
        recover_velocity(u_a, x_t, sig, random_basis(512, 128), 1.0)
    with pytest.raises(ValueError, match="exceeds the patch dimension"):
        recover_velocity(u_a[..., :64], x_t[..., :64], sig, torch.zeros(64, 65, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="scale"):
        recover_velocity(u_a, x_t, sig, basis, -1.0)
    with pytest.raises(ValueError, match="sigma must have shape"):
        recover_velocity(u_a, x_t, torch.ones(3, dtype=torch.float64), basis, 1.0)
