"""Adaptive sampler vs closed-form flows: exact integrator, convergence as tol → 0, rejection, NFE budget, seeds."""
from __future__ import annotations

import math

import pytest
import torch

from asymflow.adaptive import (
    SIGMA_MAX,
    AdaptiveConfig,
    corrector_terms,
    exponential_step,
    log_snr,
    phi_weights,
    sample_adaptive,
    sigma_at,
)
from asymflow.convert import convert_transformer
from asymflow.guidance import clamp_denoised, guidance_scale_at, orthogonal_guidance
from asymflow.pipeline import AsymFlux2KleinPipeline, sample_images
from asymflow.scheduler import FlowAdapterScheduler
from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_LAYERS, build_tiny_text_encoder, build_tiny_tokenizer
from asymflow.tiny import build_tiny_transformer
from tests.asymflow.helpers import random_basis

SHAPE = (2, 3, 8, 8)


class GaussianFlow:
    """Data x_0 ~ N(μ, diag(s²)): x̂₀(x, σ) = μ + α·s²/(α²s² + σ²)·(x − α·μ), u = (x − x̂₀)/σ (α = 1 − σ).

    Its flow from x(σ_a) ends at x_0 = μ + s·(x(σ_a) − α_a·μ)/√(α_a²s² + σ_a²) (x(σ) = α·μ + √(α²s² + σ²)·z along
    every trajectory). Counts its evaluations.
    """

    def __init__(self, seed: int = 0, s_range: tuple[float, float] = (0.05, 2.0)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64)
        lo, hi = s_range
        self.s = lo + (hi - lo) * torch.rand(SHAPE[1:], generator=g, dtype=torch.float64)
        self.calls = 0

    def x0(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1.0 - sigma
        return self.mu + a * self.s**2 / (a * a * self.s**2 + sigma**2) * (x - a * self.mu)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        return (x - self.x0(x, sigma)) / sigma

    def exact_end(self, x_a: torch.Tensor, sigma_a: float) -> torch.Tensor:
        a = 1.0 - sigma_a
        return self.mu + self.s * (x_a - a * self.mu) / (a * a * self.s**2 + sigma_a**2).sqrt()


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).flatten(1).mean(1).sqrt().max())


def test_phi_weights_are_the_exponential_integrals() -> None:
    """ψ_k(h) = h∫₀¹ e^{−h(1−τ)} τ^k dτ, checked by the midpoint rule with 200k nodes (error ~1e-11)."""
    n = 200_000
    tau = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for h in (1e-3, 0.1, 1.0, 4.0, 12.0):
        w = h * torch.exp(-h * (1 - tau)) / n
        expected = [float((w * tau**k).sum()) for k in range(3)]
        assert phi_weights(h) == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_log_snr_round_trip() -> None:
    for sigma in (1e-3, 0.2, 0.5, 0.9, SIGMA_MAX):
        assert sigma_at(log_snr(sigma)) == pytest.approx(sigma, rel=1e-12)
    assert log_snr(0.5) == 0.0


def test_constant_x0_step_is_exact_and_is_euler_in_sigma() -> None:
    """Along x(σ) = (1−σ)·x_0 + σ·ε the data prediction is x_0 throughout: the step lands exactly on x(σ_t), and
    with a = b = 0 the step equals Euler in σ, x_s + (σ_t − σ_s)·u with u = (x_s − x_0)/σ_s (DDIM = Euler)."""
    g = torch.Generator().manual_seed(0)
    x_0, eps = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    for s, t in ((SIGMA_MAX, 0.7), (0.7, 0.05), (0.3, 0.29)):
        x_s = (1 - s) * x_0 + s * eps
        stepped = exponential_step(x_s, s, t, x_0, None, None)
        torch.testing.assert_close(stepped, (1 - t) * x_0 + t * eps, rtol=0, atol=1e-12)
        torch.testing.assert_close(stepped, x_s + (t - s) * (x_s - x_0) / s, rtol=0, atol=1e-12)


def test_polynomial_x0_step_matches_quadrature() -> None:
    """x_t = (σ_t/σ_s)·x_s + σ_t∫_{λ_s}^{λ_t} e^λ D(λ) dλ for D = D_s + τa + τ²b (midpoint rule, 100k nodes)."""
    g = torch.Generator().manual_seed(2)
    x_s, d_s, a, b = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4))
    s, t = 0.8, 0.3
    lam_s, lam_t = log_snr(s), log_snr(t)
    n = 100_000
    tau = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    w = torch.exp(lam_s + tau * (lam_t - lam_s)) * (lam_t - lam_s) / n
    integral = [t * float((w * tau**k).sum()) for k in range(3)]
    expected = (t / s) * x_s + integral[0] * d_s + integral[1] * a + integral[2] * b
    torch.testing.assert_close(exponential_step(x_s, s, t, d_s, a, b), expected, rtol=1e-8, atol=1e-9)


def test_corrector_interpolates_its_three_points() -> None:
    g = torch.Generator().manual_seed(3)
    d_prev, d_s, d_t = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    r = 0.7
    a, b = corrector_terms(d_s, d_t, d_prev, r)
    torch.testing.assert_close(d_s + a + b, d_t)  # τ = 1
    torch.testing.assert_close(d_s - r * a + r * r * b, d_prev)  # τ = −r


def test_point_mass_data_is_exact_with_a_closed_form_nfe() -> None:
    """Data = one image μ: x̂₀ ≡ μ, so every error estimate is 0, nothing is rejected and the result is μ. Steps:
    λ₀ = λ(1 − 1e-4), one initial_step, then max_step until σ ≤ finish_sigma (λ ≥ 0), where the remaining change
    is 0: NFE = 2 + ⌈(0 − λ₀ − initial_step)/max_step⌉."""
    flow = GaussianFlow(s_range=(0.0, 0.0))
    cfg = AdaptiveConfig(initial_step=4.0, max_step=1.0, finish_sigma=0.5)
    x, report = sample_adaptive(flow, _noise(), cfg)
    torch.testing.assert_close(x, flow.mu.expand(SHAPE), rtol=0, atol=1e-12)
    assert report.nfe == 2 + math.ceil((0.0 - log_snr(SIGMA_MAX) - 4.0) / 1.0) == flow.calls == len(report.sigmas)
    assert report.rejected == 0 and report.finished_by == "tolerance"


def test_converges_to_the_exact_flow_as_tol_goes_to_zero() -> None:
    """Gaussian data: the error to the exact end point falls with tol; each accepted step keeps its estimated
    x̂₀ error within atol + rtol·|x̂₀| (RMS), and the Gaussian flow carries an x̂₀-unit error to the end shrunk by
    α·s/√(α²s² + σ²) ≤ 1, so the total stays below (steps + 1)·(atol + rtol·max|x̂₀|)."""
    flow = GaussianFlow()
    noise = _noise()
    exact = flow.exact_end(noise, SIGMA_MAX)
    errors, nfes = [], []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        x, report = sample_adaptive(flow, noise, AdaptiveConfig.from_tol(tol, max_nfe=1000))
        err = _rms(x - exact)
        bound = len(report.accepted) * tol * (1 + float(exact.abs().max()))
        assert err <= bound, (tol, err, bound)
        errors.append(err)
        nfes.append(report.nfe)
    assert all(e1 < e0 / 3 for e0, e1 in zip(errors, errors[1:])), errors
    assert nfes == sorted(nfes) and errors[-1] < 1e-3


def test_tight_tolerance_rejects_steps_and_accounts_for_every_evaluation() -> None:
    """A first step of 8 in λ (σ 0.9999 → 0.95) is far too long for tol 1e-5 and is rejected; every evaluation is the
    start, an accepted step or a rejected one."""
    flow = GaussianFlow()
    x, report = sample_adaptive(flow, _noise(), AdaptiveConfig.from_tol(1e-5, initial_step=8.0, max_nfe=1000))
    assert report.rejected >= 1
    assert report.sigmas[1] == pytest.approx(sigma_at(log_snr(SIGMA_MAX) + 8.0))  # the first, rejected, try
    assert report.sigmas[1] not in report.accepted
    assert report.nfe == len(report.sigmas) == 1 + (len(report.accepted) - 1) + report.rejected == flow.calls
    loose = sample_adaptive(GaussianFlow(), _noise(), AdaptiveConfig.from_tol(0.05))[1]
    assert loose.rejected < report.rejected


@pytest.mark.parametrize("max_nfe", [2, 5, 12])
def test_nfe_budget_is_never_exceeded(max_nfe: int) -> None:
    """tol 1e-7 would need hundreds of evaluations: the budget caps them, and the last steps are stretched
    (accepted whatever their error) so the sampler still reaches sigma_min."""
    flow = GaussianFlow()
    x, report = sample_adaptive(flow, _noise(), AdaptiveConfig.from_tol(1e-7, max_nfe=max_nfe))
    assert flow.calls == report.nfe <= max_nfe
    assert report.finished_by == "sigma_min" and report.accepted[-1] == pytest.approx(1e-3)
    assert report.forced >= 1 and torch.isfinite(x).all()


def test_last_evaluation_of_the_budget_always_reaches_sigma_min() -> None:
    """Budget 1 left and a proposed step exactly as long as what remains to sigma_min: rejecting it would end the
    run short of sigma_min, so it is accepted (forced)."""
    cfg = AdaptiveConfig.from_tol(1e-7, max_nfe=2, sigma_min=0.9, initial_step=8.0)  # 8 > λ(0.9) − λ₀ ≈ 7.0
    _, report = sample_adaptive(GaussianFlow(), _noise(), cfg)
    assert report.nfe == 2 and report.rejected == 0 and report.forced == 1
    assert report.finished_by == "sigma_min" and report.accepted[-1] == pytest.approx(0.9)


def test_config_rejects_nonsense() -> None:
    for bad in ({"rtol": 0.0, "atol": 0.0}, {"max_nfe": 1}, {"sigma_min": 0.0}, {"max_step": 0.0},
                {"min_factor": 1.5}):
        with pytest.raises(ValueError):
            AdaptiveConfig(**bad)


# ---------------------------------------------------------------- through the pipeline (recovery, CFG, clamp)


@pytest.fixture(scope="module")
def pixel_model() -> torch.nn.Module:
    basis = random_basis(768, 128, seed=0).float().contiguous()
    return convert_transformer(build_tiny_transformer(), basis, 1.3).eval()


def _embeds(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 8, 96, generator=g), torch.randn(1, 8, 96, generator=g)


def test_adaptive_runs_the_guided_clamped_velocity_once_per_evaluation(pixel_model) -> None:
    cond, neg = _embeds()
    sizes: list[int] = []
    hook = pixel_model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["x_t"].shape[0]), with_kwargs=True)
    try:
        images, report = sample_images(pixel_model, cond, neg, height=32, width=32, sampler="adaptive",
                                       adaptive=AdaptiveConfig.from_tol(0.05), return_report=True,
                                       generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert sizes == [2 * len(cond)] * report.nfe  # cond + uncond in one batched call per evaluation
    assert report.sampler == "adaptive" and images.shape == (2, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_adaptive_integrates_the_guided_velocity_to_its_closed_form_end() -> None:
    """CFG with γ = 0 of two Gaussian flows with the same s and means μ_u = 0, μ_c = μ is the Gaussian flow of mean
    w·μ (x̂₀ is affine in μ, and u = (x − x̂₀)/σ): through sample_images the adaptive sampler converges to its end
    point μ_w + s·(ε − α₀μ_w)/√(α₀²s² + σ₀²) (σ₀ = 1 − 1e-4, α₀ = 1e-4), not to that of either flow alone."""
    w, shape = 3.0, (2, 3, 16, 16)
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(shape[1:], generator=g)
    s = 0.1 + torch.rand(shape[1:], generator=g)

    def model(x_t: torch.Tensor, sigma: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # the first embedding entry (1 = cond, 0 = uncond) scales the mean
        m = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1) * mu
        sg = float(sigma[0])
        a = 1.0 - sg
        return (x_t - (m + a * s**2 / (a * a * s**2 + sg**2) * (x_t - a * m))) / sg

    cond, neg = torch.ones(2, 1, 4), torch.zeros(1, 1, 4)
    noise = torch.randn(shape, generator=g)
    mu_w = w * mu
    exact = mu_w + s * (noise - (1 - SIGMA_MAX) * mu_w) / ((1 - SIGMA_MAX) ** 2 * s**2 + SIGMA_MAX**2).sqrt()
    errors = []
    for tol in (1e-2, 1e-4):
        x = sample_images(model, cond, neg, height=16, width=16, guidance_scale=w, orthogonal_strength=0.0,
                          clamp_denoised=False, noise=noise, decode=False, sampler="adaptive",
                          adaptive=AdaptiveConfig.from_tol(tol, max_nfe=500))
        errors.append(_rms(x - exact))
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-3 * (1 + float(mu_w.abs().max())), errors


def test_same_seed_same_result_other_seed_other_result(pixel_model) -> None:
    cond, neg = _embeds()

    def run(seed: int):
        return sample_images(pixel_model, cond, neg, height=32, width=32, sampler="adaptive", return_report=True,
                             adaptive=AdaptiveConfig.from_tol(0.02), generator=torch.Generator().manual_seed(seed))

    (a, ra), (b, rb), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a, b) and ra.sigmas == rb.sigmas
    assert not torch.equal(a, c)


def test_fixed_path_is_the_spec_loop_unchanged(pixel_model) -> None:
    """sampler="fixed" (the default) is bit for bit spec §11.3: model → orthogonal CFG (inside the interval) →
    clamp_denoised → scheduler.step, and reports NFE = steps at the scheduler's σ."""
    cond, neg = _embeds()
    steps, interval = 5, (0.0, 0.95)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    images, report = sample_images(pixel_model, cond, neg, height=32, width=32, num_inference_steps=steps,
                                   guidance_interval=interval, noise=noise, return_report=True, decode=False)
    assert torch.equal(images, sample_images(pixel_model, cond, neg, height=32, width=32, num_inference_steps=steps,
                                             guidance_interval=interval, noise=noise, decode=False, sampler="fixed"))
    scheduler = FlowAdapterScheduler()
    scheduler.set_timesteps(steps, seq_len=32 * 32)
    x, both = noise.clone(), torch.cat([neg.expand(2, -1, -1), cond])
    with torch.no_grad():
        for i in range(steps):
            sigma = float(scheduler.sigmas[i])
            sig = torch.full((2,), sigma)
            w = guidance_scale_at(sigma, 4.0, interval)
            if w != 1.0:
                u_u, u_c = pixel_model(x_t=torch.cat([x, x]), sigma=torch.cat([sig, sig]),
                                       encoder_hidden_states=both).float().chunk(2)
                u = orthogonal_guidance(u_c, u_u, x, sigma, w, 1.0)
            else:
                u = pixel_model(x_t=x, sigma=sig, encoder_hidden_states=cond).float()
            x = scheduler.step(clamp_denoised(u, x, sigma), i, x).prev_sample
    assert torch.equal(images, x)
    assert report.sampler == "fixed" and report.nfe == steps
    assert report.sigmas == [float(s) for s in scheduler.sigmas[:-1]]


def test_pipeline_offers_the_adaptive_sampler_and_reports_nfe(pixel_model) -> None:
    pipe = AsymFlux2KleinPipeline(pixel_model, FlowAdapterScheduler(), build_tiny_text_encoder(),
                                  build_tiny_tokenizer(), text_hidden_layers=TINY_TEXT_LAYERS,
                                  max_sequence_length=TINY_MAX_LENGTH)
    kw = dict(height=32, width=32, progress=False, output_type="pt")
    out = pipe("a red cat", sampler="adaptive", tol=0.05, max_nfe=6, generator=torch.Generator().manual_seed(0), **kw)
    assert out.images.shape == (1, 3, 32, 32) and out.nfe == len(out.sigmas) <= 6
    fixed = pipe("a red cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kw)
    assert fixed.nfe == 3 and len(fixed.sigmas) == 3
    with pytest.raises(ValueError, match="adaptive"):
        pipe("a red cat", num_inference_steps=3, tol=0.1, **kw)
