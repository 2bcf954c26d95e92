"""Error-controlled adaptive sampler: variable-step predictor–corrector on x̂₀, step rejection, a hard NFE budget."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

# Written by hand: diffusers' multistep solvers (UniPC, DPM-Solver++) fix their σ grid in set_timesteps and keep their
# history inside the scheduler with no way to propose the next σ from an error estimate or to undo a rejected step;
# torchdiffeq's adaptive Runge–Kutta pairs spend 3–6 model evaluations per step. This is the same family as the
# fixed sampler (UniPC's exponential integrator in data-prediction form, predictor order 2 + corrector order 3, one
# evaluation per step), with the predictor–corrector difference used as the error estimate (Milne's device).

SIGMA_MAX = 1.0 - 1e-4  # λ = log((1−σ)/σ) is −∞ at σ = 1; UniPC's grid starts here too (scheduler.UNIPC_MAX_SIGMA)

FinishedBy = Literal["tolerance", "sigma_min", "budget"]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AdaptiveConfig:
    """Tolerances and limits of `sample_adaptive` (x̂₀ in normalised Oklab: one 8-bit L step ≈ 0.0245 units).

    A step is accepted when RMS(e / (atol + rtol·max(|x̂₀_n|, |x̂₀_{n+1}|))) ≤ 1 for every sample of the batch, e being
    the step's error estimate in x̂₀ units (see `step_error`). `max_nfe` is a hard cap on model evaluations (a CFG
    pass of cond + uncond counts once, as in the fixed sampler). `initial_step` is the first step in log-SNR λ
    (from σ = 1 − 1e-4, λ = −9.2, where x̂₀ is still the mean image), `max_step` bounds every later one: x̂₀ moves
    from the mean to the sample over a few units of λ (for Gaussian data of std s, x̂₀ − μ = sε/√(1 + (σ/(αs))²)
    along the flow), and a step that jumps over that transition lands where the denoiser returns its input
    (x̂₀(x, σ) ≈ x/α for σ/α ≪ s), so the model evaluation at the predicted point confirms the prediction and the
    error estimate, which sees only the ends of the step, misses the error.
    `finish_sigma` is the σ below which the sampler may stop once the remaining change of x̂₀ is within tolerance.
    """

    rtol: float = 0.05
    atol: float = 0.05
    max_nfe: int = 64
    initial_step: float = 4.0
    max_step: float = 1.0
    sigma_min: float = 1e-3
    finish_sigma: float = 0.5
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.rtol < 0 or self.atol < 0 or self.rtol + self.atol <= 0:
            raise ValueError(f"rtol={self.rtol} and atol={self.atol} must be ≥ 0 and not both 0")
        if self.max_nfe < 2:
            raise ValueError(f"max_nfe must be ≥ 2 (one step and its check), got {self.max_nfe}")
        if not 0 < self.sigma_min < SIGMA_MAX:
            raise ValueError(f"sigma_min must be in (0, {SIGMA_MAX}), got {self.sigma_min}")
        if self.initial_step <= 0 or self.max_step <= 0:
            raise ValueError(f"initial_step and max_step must be > 0 (steps in log-SNR), got {self.initial_step}, "
                             f"{self.max_step}")
        if not 0 < self.min_factor < 1 < self.max_factor or not 0 < self.safety <= 1:
            raise ValueError("need 0 < min_factor < 1 < max_factor and 0 < safety ≤ 1")

    @classmethod
    def from_tol(cls, tol: float, **overrides: float) -> AdaptiveConfig:
        """rtol = atol = tol (the single `--tol` of the CLI), other fields as given or default."""
        return cls(**{"rtol": tol, "atol": tol, **overrides})


@dataclass
class SamplingReport:
    """What a sampler spent: `nfe` model evaluations at `sigmas` (in call order, rejected ones included),
    `accepted` σ grid of the steps kept, and how the adaptive sampler stopped (None for a fixed schedule)."""

    sampler: Literal["fixed", "adaptive"]
    nfe: int
    sigmas: list[float]
    accepted: list[float]
    rejected: int = 0
    forced: int = 0
    finished_by: FinishedBy | None = None
    errors: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "nfe": self.nfe, "sigmas": self.sigmas, "accepted": self.accepted,
                "rejected": self.rejected, "forced": self.forced, "finished_by": self.finished_by}


def log_snr(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ (finite for 0 < σ < 1)."""
    return math.log1p(-sigma) - math.log(sigma)


def sigma_at(lam: float) -> float:
    """Inverse of `log_snr`: σ = 1 / (1 + e^λ)."""
    return 1.0 / (1.0 + math.exp(lam)) if lam < 700 else 0.0


def phi_weights(h: float) -> tuple[float, float, float]:
    """ψ_k(h) = h·∫₀¹ e^{−h(1−τ)} τ^k dτ for k = 0, 1, 2 (fp64 scalars; h > 0 is the step in λ).

    ψ₀ = 1 − e^{−h},  ψ₁ = 1 − ψ₀/h,  ψ₂ = 1 − 2ψ₁/h  (integration by parts). For h → 0: ψ_k ≈ h/(k+1).
    """
    if h <= 0:
        raise ValueError(f"step in log-SNR must be > 0, got {h}")
    psi0 = -math.expm1(-h)
    psi1 = 1.0 - psi0 / h
    psi2 = 1.0 - 2.0 * psi1 / h
    return psi0, psi1, psi2


def exponential_step(
    x: torch.Tensor, sigma_s: float, sigma_t: float, d_s: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None
) -> torch.Tensor:
    """x_t from x_s when x̂₀ along the step is the polynomial D(λ_s + τh) = D_s + τ·a + τ²·b, τ ∈ [0, 1].

    Exact solution of the flow ODE in data-prediction form (x_t = α·x̂₀ + σ·ε̂, h = λ_t − λ_s):
      x_t = (σ_t/σ_s)·x_s + α_t·(ψ₀·D_s + ψ₁·a + ψ₂·b)
    a = b = 0 is DDIM (= an Euler step in σ). All tensors [B,C,H,W]; computed in x's dtype.
    """
    psi0, psi1, psi2 = phi_weights(log_snr(sigma_t) - log_snr(sigma_s))
    alpha_t = 1.0 - sigma_t
    out = (sigma_t / sigma_s) * x + (alpha_t * psi0) * d_s
    if a is not None:
        out = out + (alpha_t * psi1) * a
    if b is not None:
        out = out + (alpha_t * psi2) * b
    return out


def predictor_slope(d_s: torch.Tensor, d_prev: torch.Tensor | None, r: float) -> torch.Tensor | None:
    """Linear extrapolation of the last two x̂₀: a = (D_s − D_{s−1})/r, r = (λ_s − λ_{s−1})/h; None at the start."""
    return None if d_prev is None else (d_s - d_prev) / r


def corrector_terms(
    d_s: torch.Tensor, d_t: torch.Tensor, d_prev: torch.Tensor | None, r: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, b) of the interpolant through D_t at τ = 1, D_s at 0 and, if given, D_{s−1} at τ = −r.

    Two points: a = D_t − D_s (order 2). Three points (order 3):
      b = (D_{s−1} − D_s + r·(D_t − D_s)) / (r·(1 + r)),  a = D_t − D_s − b.
    """
    if d_prev is None:
        return d_t - d_s, None
    b = (d_prev - d_s + r * (d_t - d_s)) / (r * (1.0 + r))
    return d_t - d_s - b, b


def step_error(
    sigma_s: float, sigma_t: float, a_pred: torch.Tensor | None, a_corr: torch.Tensor, b_corr: torch.Tensor | None
) -> torch.Tensor:
    """Error estimate in x̂₀ units: (x_t^corrector − x_t^predictor)/α_t = ψ₁·(a_C − a_P) + ψ₂·b_C  [B,C,H,W].

    It is how far apart the x̂₀ the two methods integrated over the step are (weighted as the integrator weighs
    them); dividing the state difference by α_t puts it on the scale of the image (x_t = α·x̂₀ + σ·ε̂). It estimates
    the predictor's local error; the corrector, which is kept, is one order more accurate.
    """
    _, psi1, psi2 = phi_weights(log_snr(sigma_t) - log_snr(sigma_s))
    err = psi1 * (a_corr if a_pred is None else a_corr - a_pred)
    return err if b_corr is None else err + psi2 * b_corr


def error_ratio(err: torch.Tensor, d_s: torch.Tensor, d_t: torch.Tensor, rtol: float, atol: float) -> float:
    """max over the batch of RMS(err / (atol + rtol·max(|D_s|, |D_t|))) (Hairer's norm, per sample); ≤ 1 passes."""
    scale = atol + rtol * torch.maximum(d_s.abs(), d_t.abs())
    return float((err / scale).pow(2).flatten(1).mean(1).sqrt().max())


def remaining_change(d_s: torch.Tensor, d_prev: torch.Tensor, lam_s: float, lam_prev: float) -> torch.Tensor:
    """Estimate of D(λ → ∞) − D_s, the error of stopping now with x̂₀ = D_s  [B,C,H,W].

    Near the data x̂₀ settles like D(λ) ≈ D_∞ + c·e^{−λ} (= c·σ/α); fitting c to the last two values gives
    D_∞ − D_s = (D_s − D_{s−1}) / (e^{λ_s − λ_{s−1}} − 1). Where x̂₀ settles faster (a Gaussian: ∝ e^{−2λ}) this
    overestimates, i.e. errs on the side of more steps.
    """
    return (d_s - d_prev) / math.expm1(lam_s - lam_prev)


def _controller(ratio: float, order: int, cfg: AdaptiveConfig, grow: bool) -> float:
    """Step factor safety·ratio^{−1/(order+1)}, clipped to [min_factor, max_factor] (≤ 1 right after a rejection)."""
    factor = cfg.max_factor if ratio == 0 else cfg.safety * ratio ** (-1.0 / (order + 1))
    return min(cfg.max_factor if grow else 1.0, max(cfg.min_factor, factor))


@torch.no_grad()
def sample_adaptive(velocity: Velocity, noise: torch.Tensor, cfg: AdaptiveConfig = AdaptiveConfig()):
    """Integrate dx/dσ = u(x, σ) from x(σ≈1) = noise towards σ = 0; returns (x̂₀ [B,C,H,W], SamplingReport).

    velocity(x [B,C,H,W], σ) -> u [B,C,H,W]: the guided, clamped velocity (pipeline.sample_images builds it with
    the same CFG and clamp_denoised as the fixed sampler); x̂₀ = x − σ·u. Per step from λ_s to λ_t = λ_s + h:
      predictor  x_P = exponential_step(D_s, a = (D_s − D_{s−1})/r)             (order 2; order 1 on the first step)
      one model evaluation D_t = x̂₀(x_P, σ_t)
      corrector  x_C = exponential_step(D_s, quadratic through D_{s−1}, D_s, D_t) (order 3; order 2 on the first)
      e = (x_C − x_P)/α_t;  accept if error_ratio(e) ≤ 1 (keep x_C, D_t, as UniPC keeps the output at x_P), else
      retry from x_s with a smaller h. h ← h·clip(0.9·ratio^{−1/3}).
    Stops with x̂₀ = D_s (the final jump to σ = 0 of UniPC) when σ_s ≤ finish_sigma and `remaining_change` is within
    tolerance, when σ_s reaches sigma_min, or when the budget is spent. It never evaluates more than max_nfe times:
    once the budget left cannot reach sigma_min at the proposed step size, h is raised to (λ_min − λ_s)/(budget left)
    and that step is accepted whatever its error (counted as `forced`). Deterministic: no randomness beyond `noise`.
    """
    x = noise
    lam_end = log_snr(cfg.sigma_min)
    sigma_s = SIGMA_MAX
    evaluated: list[float] = []
    accepted: list[float] = [sigma_s]
    errors: list[float] = []
    rejected = forced = 0

    def denoise(x_: torch.Tensor, sigma: float) -> torch.Tensor:
        evaluated.append(sigma)
        return x_ - sigma * velocity(x_, sigma).to(x_.dtype)

    d_s = denoise(x, sigma_s)
    d_prev: torch.Tensor | None = None
    lam_prev = -math.inf
    h = cfg.initial_step
    grow = True
    finished_by: FinishedBy = "sigma_min"
    while True:
        lam_s = log_snr(sigma_s)
        if lam_s >= lam_end - 1e-9:
            finished_by = "sigma_min"
            break
        if d_prev is not None and sigma_s <= cfg.finish_sigma:
            if error_ratio(remaining_change(d_s, d_prev, lam_s, lam_prev), d_s, d_s, cfg.rtol, cfg.atol) <= 1.0:
                finished_by = "tolerance"
                break
        budget = cfg.max_nfe - len(evaluated)
        if budget <= 0:
            finished_by = "budget"
            break
        h = min(h, lam_end - lam_s) if d_prev is None else min(h, cfg.max_step, lam_end - lam_s)
        floor = (lam_end - lam_s) / budget  # the shortest step that still reaches sigma_min within the budget
        is_forced = h <= floor  # then a rejection could leave the budget short of sigma_min
        h = max(h, floor)
        sigma_t = sigma_at(lam_s + h)
        r = (lam_s - lam_prev) / h if d_prev is not None else math.inf
        a_pred = predictor_slope(d_s, d_prev, r)
        x_pred = exponential_step(x, sigma_s, sigma_t, d_s, a_pred, None)
        d_t = denoise(x_pred, sigma_t)
        a_corr, b_corr = corrector_terms(d_s, d_t, d_prev, r)
        ratio = error_ratio(step_error(sigma_s, sigma_t, a_pred, a_corr, b_corr), d_s, d_t, cfg.rtol, cfg.atol)
        errors.append(ratio)
        order = 1 if d_prev is None else 2  # of the predictor, whose error the difference estimates
        if ratio <= 1.0 or is_forced:
            forced += int(is_forced and ratio > 1.0)
            x = exponential_step(x, sigma_s, sigma_t, d_s, a_corr, b_corr)
            d_prev, d_s, lam_prev, sigma_s = d_s, d_t, lam_s, sigma_t
            accepted.append(sigma_t)
            h *= _controller(ratio, order, cfg, grow)
            grow = True
        else:
            rejected += 1
            h *= _controller(ratio, order, cfg, grow=False)
            grow = False  # no growth on the step after a rejection (Hairer & Wanner II.4)
    report = SamplingReport("adaptive", len(evaluated), evaluated, accepted, rejected, forced, finished_by, errors)
    return d_s, report
