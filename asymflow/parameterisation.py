"""The AsymFlow parameterisation (spec §3): calibration, ideal output and analytic recovery of the velocity.

All algebra runs in fp32, or fp64 when any input is fp64, whatever the dtype of the network output and whatever
autocast context the caller is in (spec §3.4a; `asymflow.precision`).
Tokens are packed channel-first patches [B,N,D]; the basis B is [D,r] with orthonormal columns.
"""
from __future__ import annotations

import torch

from .precision import fp32_algebra

SIGMA_MIN_TRAIN = 1e-6  # recovery clamp while the module is in training mode (spec §3.5)
SIGMA_MIN_EVAL_FLUX2 = 1e-4  # recovery clamp in eval mode for AsymFLUX.2 (model config `sigma_min`)
ORTHONORMAL_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def algebra_dtype(*tensors: torch.Tensor | float) -> torch.dtype:
    """fp64 if any tensor input is fp64, else fp32 (never lower)."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def as_scale(scale: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The scalar data scale s as a 0-d tensor; refuses non-scalars and s ≤ 0."""
    s = torch.as_tensor(scale, dtype=dtype, device=device)
    if s.numel() != 1:
        raise ValueError(f"scale must be a scalar, got shape {tuple(s.shape)}")
    s = s.reshape(())
    if not torch.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a finite positive number, got {float(s)}")
    return s


@fp32_algebra
def calibrate(sigma: torch.Tensor | float, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k(σ) = 1/(s + (1−s)σ) and calibrated time σ̃ = k·σ (= warp(σ; 1/s)); spec §3.2.

    Returns (k, sigma_cal) with the shape of sigma, in fp32 (fp64 if sigma is fp64).
    Identity: k·x_t = (1 − σ̃)·(x_0/s) + σ̃·ε.
    """
    sigma = torch.as_tensor(sigma)
    dtype = algebra_dtype(sigma)
    sigma = sigma.to(dtype)
    s = as_scale(scale, dtype, sigma.device)
    k = 1.0 / (s + (1.0 - s) * sigma)
    return k, k * sigma


def check_basis(basis: torch.Tensor, dim: int | None = None, rank: int | None = None) -> None:
    """Raise ValueError unless basis is a finite [D,r] matrix with r ≤ D and orthonormal columns."""
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2:
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise ValueError(f"basis must be a [D, r] matrix, got {shape}")
    d, r = basis.shape
    if dim is not None and d != dim:
        raise ValueError(f"basis has {d} rows but the patch dimension is {dim}")
    if rank is not None and r != rank:
        raise ValueError(f"basis has rank {r} but {rank} was expected")
    if r > d:
        raise ValueError(f"basis rank {r} exceeds the patch dimension {d}")
    if not torch.isfinite(basis).all():
        raise ValueError("basis contains NaN or inf")
    if r == 0:
        return
    b = basis.to(algebra_dtype(basis))
    err = (b.T @ b - torch.eye(r, dtype=b.dtype, device=b.device)).abs().max().item()
    tol = ORTHONORMAL_TOL.get(basis.dtype, 1e-4)
    if err > tol:
        raise ValueError(f"basis columns are not orthonormal: max |BᵀB − I| = {err:.3g} > {tol:g}")


def check_finite(**tensors: torch.Tensor | float) -> None:
    """Raise ValueError naming every input that holds NaN or inf."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(torch.as_tensor(t)).all()]
    if bad:
        raise ValueError(f"non-finite values (NaN or inf) in: {', '.join(bad)}")


def project(tokens: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P·x per token for row-vector tokens: x·B·Bᵀ ([..., D] -> [..., D])."""
    return (tokens @ basis) @ basis.T


def _per_sample(sigma: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must have shape [B]=[{batch}], got {tuple(sigma.shape)}")
    return sigma.view(batch, 1, 1)


def _check_tokens(basis: torch.Tensor, **tokens: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tokens.items()}
    first = next(iter(shapes.values()))
    if len(first) != 3 or any(s != first for s in shapes.values()):
        raise ValueError(f"token tensors must share one [B,N,D] shape, got {shapes}")
    if basis.ndim != 2 or basis.shape[0] != first[2]:
        raise ValueError(f"basis shape {tuple(basis.shape)} does not match token dim D={first[2]}")


def _recovery_inputs(u_a, x_t, sigma, basis, scale, validate: bool):
    """Shared prologue of the recovery functions: optional checks, casts to the algebra dtype, σ as [B,1,1], s, k."""
    if validate:
        _check_tokens(basis, u_a=u_a, x_t=x_t)
        check_finite(u_a=u_a, x_t=x_t, sigma=sigma, scale=scale)
        check_basis(basis)
    dtype = algebra_dtype(u_a, x_t, basis)
    u_a, x_t, basis = u_a.to(dtype), x_t.to(dtype), basis.to(dtype)
    sig = _per_sample(sigma, x_t.shape[0], dtype, x_t.device)
    s = as_scale(scale, dtype, x_t.device)
    k = 1.0 / (s + (1.0 - s) * sig)
    return u_a, x_t, basis, sig, s, k


@fp32_algebra
def recover_velocity(
    u_a: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    basis: torch.Tensor,
    scale: float | torch.Tensor,
    sigma_min: float = SIGMA_MIN_TRAIN,
    validate: bool = True,
) -> torch.Tensor:
    """Full velocity û from the network output û_a (spec §3.4), on packed tokens [B,N,D].

    σ_c = max(σ, σ_min); k uses the raw σ.
      P·û  = s·k·P·û_a + (1 − s·k)·P·x_t / σ_c
      P⊥·û = (P⊥·x_t + s·P⊥·û_a) / σ_c
    With û_a = Pε − x_0/s and x_t = (1−σ)x_0 + σε this returns ε − x_0 exactly.
    `validate=False` skips the finiteness/orthonormality checks (used inside the model's forward,
    where a non-finite network output must reach the trainer's skip logic instead of raising).
    """
    u_a, x_t, basis, sig, s, k = _recovery_inputs(u_a, x_t, sigma, basis, scale, validate)
    sigma_c = sig.clamp_min(sigma_min)
    u_a_sub = project(u_a, basis)
    x_t_sub = project(x_t, basis)
    sub = s * k * u_a_sub + (1.0 - s * k) * x_t_sub / sigma_c
    comp = ((x_t - x_t_sub) + s * (u_a - u_a_sub)) / sigma_c
    return sub + comp


@fp32_algebra
def recover_x0(
    u_a: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    basis: torch.Tensor,
    scale: float | torch.Tensor,
    validate: bool = True,
) -> torch.Tensor:
    """Data prediction x̂_0 = s·k·P·(x_t − σ·û_a) − s·P⊥·û_a (spec §3.4, x0 form; no division by σ).

    Equals x_t − σ·recover_velocity(...) whenever σ ≥ σ_min.
    """
    u_a, x_t, basis, sig, s, k = _recovery_inputs(u_a, x_t, sigma, basis, scale, validate)
    u_a_sub = project(u_a, basis)
    return s * k * project(x_t - sig * u_a, basis) - s * (u_a - u_a_sub)


@fp32_algebra
def ideal_output(x_0: torch.Tensor, eps: torch.Tensor, basis: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The ideal network output u_a* = P·ε − x_0/s (spec §3.1), tokens [B,N,D]."""
    dtype = algebra_dtype(x_0, eps, basis)
    s = as_scale(scale, dtype, x_0.device)
    return project(eps.to(dtype), basis.to(dtype)) - x_0.to(dtype) / s
