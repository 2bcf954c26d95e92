"""Classifier-free guidance with orthogonal projection and clamp_denoised (spec §11.2, §11.4)."""
from __future__ import annotations

import torch

from .oklab import OKLAB_MEAN, OKLAB_STD, oklab_decode, oklab_encode


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def orthogonal_guidance(
    u_cond: torch.Tensor,
    u_uncond: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor | float,
    scale: float,
    strength: float = 1.0,
) -> torch.Tensor:
    """u = u_c + Δ, Δ = (w−1)(u_c − u_u) minus γ times its component along d = x_t − σ·u_c.

    ⟨a,b⟩ is the per-sample mean over all non-batch elements; the projection uses max(⟨d,d⟩, 1e-6).
    γ = 0 is standard CFG; w = 1 returns u_c.
    """
    if not (u_cond.shape == u_uncond.shape == x_t.shape):
        raise ValueError(
            f"u_cond {tuple(u_cond.shape)}, u_uncond {tuple(u_uncond.shape)} and x_t {tuple(x_t.shape)} must match"
        )
    dtype = torch.float64 if u_cond.dtype == torch.float64 else torch.float32
    u_c, u_u, x = u_cond.to(dtype), u_uncond.to(dtype), x_t.to(dtype)
    delta = (scale - 1.0) * (u_c - u_u)
    if strength != 0:
        d = x - _per_sample(sigma, x) * u_c
        dims = tuple(range(1, x.ndim))
        coeff = (delta * d).mean(dims, keepdim=True) / (d * d).mean(dims, keepdim=True).clamp_min(1e-6)
        delta = delta - strength * coeff * d
    return u_c + delta


def clamp_denoised(
    u: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor | float,
    mean: tuple[float, float, float] = OKLAB_MEAN,
    std: float = OKLAB_STD,
) -> torch.Tensor:
    """Project the implied x̂_0 onto the sRGB gamut: decode, clamp to [−1,1], re-encode; u ← (x_t − x̂_0')/max(σ,1e-4)."""
    sig = _per_sample(sigma, x_t)
    x0 = x_t - sig * u
    img = oklab_decode(x0, mean, std).clamp(-1.0, 1.0)
    x0_clamped = oklab_encode(img, mean, std).to(u.dtype)
    return (x_t - x0_clamped) / sig.clamp_min(1e-4)
