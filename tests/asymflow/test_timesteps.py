"""Spec §1.1–1.2: shift warp and its inverse, the logit-normal sampler's quantiles."""
import math

import torch

from asymflow.timesteps import DynamicShift, TimestepSampler, unwarp, warp


def test_warp_inverse_and_endpoints():
    tau = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (1.0, 3.0, 17.0):
        assert torch.allclose(unwarp(warp(tau, shift), shift), tau, atol=1e-14)
        assert warp(torch.tensor(0.0), shift) == 0 and warp(torch.tensor(1.0), shift) == 1


def test_sampler_quantiles_match_closed_form():
    """σ = warp(sigmoid(n); 17): quantile q of σ is warp(sigmoid(Φ⁻¹(q)); 17) (monotone map)."""
    sampler = TimestepSampler(logit_normal=True, mean=0.0, std=1.0, shift=17.0)
    n = 100_000
    sigma = sampler.sample(n, torch.Generator().manual_seed(0)).double()
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (0.05, 0.5, 0.95):
        z = normal.icdf(torch.tensor(q, dtype=torch.float64))
        tau = torch.sigmoid(z)
        expected = warp(tau, 17.0).item()
        # s.e. of a sample quantile: sqrt(q(1−q)/n) / f_σ(x_q), with f_σ = φ(z) / (dσ/dτ · dτ/dz)
        dsigma_dz = 17.0 / (1 + 16.0 * tau) ** 2 * tau * (1 - tau)
        se = math.sqrt(q * (1 - q) / n) * dsigma_dz.item() / math.exp(normal.log_prob(z).item())
        assert abs(torch.quantile(sigma, q).item() - expected) < 4 * se
    assert abs(torch.quantile(sigma, 0.5).item() - 17 / 18) < 2e-3  # median: τ = 1/2 → σ = 17/18 ≈ 0.944


def test_sampler_is_deterministic_in_generator():
    s = TimestepSampler()
    a = s.sample(8, torch.Generator().manual_seed(3))
    b = s.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    u = TimestepSampler(logit_normal=False, shift=1.0).sample(1000, torch.Generator().manual_seed(0))
    assert (u > 0).all() and (u <= 1).all()


def test_dynamic_shift_exp_interpolates_log_shift():
    ds = DynamicShift(kind="exp", base_len=256, max_len=4096, base_shift=0.5 * math.e, max_shift=1.15 * math.e)
    assert math.isclose(ds(256), 0.5 * math.e) and math.isclose(ds(4096), 1.15 * math.e)
    mid = ds((256 + 4096) / 2)
    assert math.isclose(math.log(mid), (math.log(0.5 * math.e) + math.log(1.15 * math.e)) / 2)
    s = TimestepSampler(shift=ds).sample(4, torch.Generator().manual_seed(0), seq_len=256)
    assert s.shape == (4,)
