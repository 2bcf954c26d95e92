"""Classifier-free guidance with orthogonal projection and clamp_denoised (spec §11.2, §11.4)."""
from __future__ import annotations

from collections.abc import Callable

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


def guidance_scale_at(sigma: float, scale: float, interval: tuple[float, float] | None) -> float:
    """w inside the guidance interval lo ≤ σ ≤ hi (everywhere if None), 1 (no guidance) outside it."""
    if interval is None:
        return scale
    lo, hi = interval
    return scale if lo <= sigma <= hi else 1.0


def guided_velocity(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    prompt_embeds: torch.Tensor,
    both_embeds: torch.Tensor | None,
    scale: float,
    strength: float = 1.0,
    clamp: bool = True,
    mean: tuple[float, float, float] = OKLAB_MEAN,
    std: float = OKLAB_STD,
) -> torch.Tensor:
    """The velocity every sampler integrates at one σ: model → orthogonal CFG (if w ≠ 1) → clamp_denoised (if on).

    model(x_t=[B,3,H,W], sigma=[B], encoder_hidden_states=[B,L,D]) -> u [B,3,H,W]. x [B,3,H,W] fp32;
    both_embeds = cat(uncond [B,L,D], cond [B,L,D]) (uncond first), needed when scale ≠ 1: cond and uncond
    run as one batched call. Returns u [B,3,H,W] fp32.
    """
    batch = x.shape[0]
    sigmas = torch.full((batch,), sigma, device=x.device, dtype=torch.float32)
    if scale != 1.0:
        if both_embeds is None:
            raise ValueError(f"guidance scale {scale} needs the negative prompt embeddings")
        u_u, u_c = model(
            x_t=torch.cat([x, x]), sigma=torch.cat([sigmas, sigmas]), encoder_hidden_states=both_embeds
        ).float().chunk(2)
        u = orthogonal_guidance(u_c, u_u, x, sigma, scale, strength)
    else:
        u = model(x_t=x, sigma=sigmas, encoder_hidden_states=prompt_embeds).float()
    if clamp:
        u = clamp_denoised(u, x, sigma, mean, std)
    return u
