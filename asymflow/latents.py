"""FLUX.2 VAE latents as the base transformer expects them: 2×2-patchified, batch-norm normalised grids."""
from __future__ import annotations

import torch

from .patching import patchify_grid, unpatchify_grid

LATENT_PATCH = 2  # FLUX.2 packs 2×2 latent pixels into one token


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def vae_downsample_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """RGB images in [−1,1] [B,3,H,W] -> normalised latent grid [B, 4·C_lat, H/(2f), W/(2f)] (mode of the posterior)."""
    factor = vae_downsample_factor(vae) * LATENT_PATCH
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by {factor} (VAE factor × latent patch 2)")
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
    grid = patchify_grid(latents, LATENT_PATCH)
    mean, std = _bn_stats(vae, grid)
    return (grid - mean) / std


@torch.no_grad()
def decode_latents(vae, grid: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_latents` up to the VAE's reconstruction: normalised grid -> RGB in [−1,1]."""
    param = next(vae.parameters())
    grid = grid.to(param.device, param.dtype)
    mean, std = _bn_stats(vae, grid)
    latents = unpatchify_grid(grid * std + mean, LATENT_PATCH)
    return vae.decode(latents).sample.clamp(-1, 1)
