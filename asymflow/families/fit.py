"""A family's VAE latents as channel-first latent tokens, and the Procrustes fit of B, s against Oklab pixel tokens."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from asymflow.oklab import oklab_encode
from asymflow.patching import pack, patchify
from asymflow.subspace import ProcrustesFit

from .core import ModelFamily


@torch.no_grad()
def family_latents(family: ModelFamily, vae, images: torch.Tensor) -> torch.Tensor:
    """RGB images in [−1,1] [B,3,H,W] → the family's normalised latent image [B, C_lat, H/f, W/f] (posterior mode).

    "scale_shift": (z − shift_factor)·scaling_factor with the VAE config's factors (FLUX.1, SD3, Sana pipelines);
    "mean_std": (z − latents_mean)/latents_std per channel (Qwen-Image; its VAE encodes [B,3,T=1,H,W] videos).
    """
    param = next(vae.parameters())
    images = images.to(param.device, param.dtype)
    if family.latent_normalisation == "scale_shift":
        encoded = vae.encode(images)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent  # DC-AE: no dist
        return (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    if family.latent_normalisation == "mean_std":
        latents = vae.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) / std
    raise ValueError(f"{family.name} normalises packed latents; use latent_tokens")


def latent_tokens(family: ModelFamily, vae, images: torch.Tensor) -> torch.Tensor:
    """Normalised latent tokens [B, N, C_lat·q²] in channel-first order, on the grid of the p×p pixel patches."""
    p = family.pixel_patch
    if images.shape[-1] % p or images.shape[-2] % p:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the pixel patch {p}")
    if family.latent_normalisation == "batch_norm":
        from asymflow.latents import encode_latents

        return pack(encode_latents(vae, images))  # FLUX.2: packed channel-first grid, then its statistics
    return patchify(family_latents(family, vae, images), family.latent_patch, "channel_first")


def pixel_tokens(family: ModelFamily, images: torch.Tensor) -> torch.Tensor:
    """Oklab-encoded pixel tokens [B, N, 3·p²], channel-first (spec §4.2)."""
    return patchify(oklab_encode(images), family.pixel_patch, "channel_first")


def fit_family_subspace(family: ModelFamily, vae, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Procrustes B [3·p², C_lat·q²] (float64) and s from co-located token pairs of image batches in [−1,1]."""
    fit = ProcrustesFit()
    for images in batches:
        z, x = latent_tokens(family, vae, images), pixel_tokens(family, images)
        fit.update(z.flatten(0, 1), x.flatten(0, 1))
    return fit.solve()
