"""FlowAdapterScheduler: σ grid, dynamic shift (spec §14 #13), Euler / UniPC exactness on a linear toy flow."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asymflow.scheduler import UNIPC_MAX_SIGMA, FlowAdapterScheduler, flow_sigmas
from asymflow.timesteps import DynamicShift


def _toy(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)
    eps = torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)
    return x_0, eps


def _run(scheduler: FlowAdapterScheduler, velocity, x: torch.Tensor) -> torch.Tensor:
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), t, x).prev_sample
    return x


@pytest.mark.parametrize("n, shift", [(1, 17.0), (7, 17.0), (32, 3.0), (50, 1.0)])
def test_sigma_grid_is_the_warped_linspace(n: int, shift: float) -> None:
    tau = np.linspace(1.0, 0.0, n, endpoint=False)
    expected = np.append(shift * tau / (1.0 + (shift - 1.0) * tau), 0.0)
    s = FlowAdapterScheduler(shift=shift)
    s.set_timesteps(n)
    assert s.sigmas.dtype == torch.float64 and s.sigmas.shape == (n + 1,)
    # 1e-15: only the last-bit rounding of numpy's linspace vs ours may differ.
    np.testing.assert_allclose(s.sigmas.numpy(), expected, rtol=0, atol=1e-15)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    assert torch.equal(s.timesteps, 1000.0 * s.sigmas[:-1])
    # The UniPC base sees the same grid in fp32 with σ_0 clamped (its log-SNR is infinite at σ = 1).
    assert s.base.sigmas[0] == torch.tensor(UNIPC_MAX_SIGMA, dtype=torch.float32)
    assert torch.equal(s.base.sigmas[1:], s.sigmas[1:].float())


def test_released_dynamic_shift_values() -> None:
    """Spec §14 #13: sqrt type, L = H·W, 1024² → 17, 2048² → 34, hence S = 17·√(H·W)/1024."""
    rule = DynamicShift()  # defaults are the released AsymFLUX.2 settings
    assert rule(1024**2) == pytest.approx(17.0, abs=1e-12)
    assert rule(2048**2) == pytest.approx(34.0, abs=1e-12)
    derived = 17.0 * math.sqrt(960 * 1280) / 1024
    assert rule(960 * 1280) == pytest.approx(derived, abs=1e-12)
    assert round(rule(960 * 1280), 2) == 18.40


def test_dynamic_shift_is_evaluated_at_seq_len_and_survives_save_load(tmp_path) -> None:
    s = FlowAdapterScheduler(dynamic_shift=DynamicShift())
    s.set_timesteps(10, seq_len=960 * 1280)
    assert torch.equal(s.sigmas, flow_sigmas(10, 17.0 * math.sqrt(960 * 1280) / 1024))
    with pytest.raises(ValueError, match="sequence length"):
        s.set_timesteps(10)
    s.set_timesteps(10, seq_len=960 * 1280, shift=17.0)  # a per-call static override wins
    assert torch.equal(s.sigmas, flow_sigmas(10, 17.0))

    s.save_pretrained(tmp_path)
    loaded = FlowAdapterScheduler.from_pretrained(tmp_path)
    assert loaded.shift_rule == DynamicShift()
    assert loaded.config.solver == "unipc"


def test_euler_is_exact_on_the_linear_toy_flow() -> None:
    """x_t = (1−σ)x_0 + σε has constant velocity ε − x_0, so Euler telescopes to x_0 (fp64)."""
    x_0, eps = _toy()
    s = FlowAdapterScheduler(solver="euler", shift=17.0)
    s.set_timesteps(9)
    x = eps
    for i, t in enumerate(s.timesteps):
        x = s.step(eps - x_0, t, x).prev_sample
        sigma = s.sigmas[i + 1]
        torch.testing.assert_close(x, (1 - sigma) * x_0 + sigma * eps, rtol=0, atol=1e-12)
    assert (x - x_0).abs().max() < 1e-12


@pytest.mark.parametrize("n", [1, 2, 5, 32])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_with_the_exact_velocity_lands_on_x0(n: int, order: int) -> None:
    """With the exact field u(x, σ) = (x − x_0)/σ the data prediction x − σ̂u is x_0 wherever the solver's σ̂
    equals σ, and the last (first-order, σ_next = 0) step returns it. Only σ̂_0 = 1 − 1e-4 differs (the clamp),
    so a single step returns x_0 + 1e-4·(ε − x_0). Tolerance 1e-6: UniPC's coefficients are fp32."""
    x_0, eps = _toy(1)
    s = FlowAdapterScheduler(solver_order=order)
    s.set_timesteps(n)
    x = _run(s, lambda x, sigma: (x - x_0) / sigma, eps)
    expected = x_0 + (1.0 - float(s.base.sigmas[0])) * (eps - x_0) if n == 1 else x_0
    assert (x - expected).abs().max() < 1e-6


@pytest.mark.parametrize("n", [1, 4, 32])
def test_unipc_with_the_constant_velocity_follows_the_straight_line(n: int) -> None:
    """With u ≡ ε − x_0 UniPC is exact along the line x = m + σu it starts on; since it reads the start
    as σ̂_0 = 1 − 1e-4 (the clamp), it ends at ε − σ̂_0·u = x_0 + 1e-4·(ε − x_0).
    Tolerance 1e-5: UniPC's coefficients are fp32."""
    x_0, eps = _toy(2)
    s = FlowAdapterScheduler()
    s.set_timesteps(n)
    u = eps - x_0
    x = _run(s, lambda x, sigma: u, eps)
    sigma_hat = float(torch.tensor(UNIPC_MAX_SIGMA, dtype=torch.float32))
    assert (x - (eps - sigma_hat * u)).abs().max() < 1e-5
    assert (x - x_0).abs().max() <= 1e-4 * u.abs().max() + 1e-5


def test_step_accepts_index_or_timestep_and_unipc_enforces_order() -> None:
    x_0, eps = _toy(3)
    by_index, by_timestep = FlowAdapterScheduler(), FlowAdapterScheduler()
    for s in (by_index, by_timestep):
        s.set_timesteps(4)
    x_i = x_t = eps
    for i, t in enumerate(by_index.timesteps):
        x_i = by_index.step(eps - x_0, i, x_i).prev_sample
        x_t = by_timestep.step(eps - x_0, t, x_t).prev_sample
    assert torch.equal(x_i, x_t)

    s = FlowAdapterScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="in order"):
        s.step(eps - x_0, 1, eps)
    with pytest.raises(ValueError, match="not in this schedule"):
        s.step(eps - x_0, 123.456, eps)
    with pytest.raises(ValueError, match="unknown solver"):
        FlowAdapterScheduler(solver="heun")
