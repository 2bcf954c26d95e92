"""FLUX.2 VAE latents as the base transformer expects them: 2×2-patchified, batch-norm normalised grids."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch

from .patching import patchify_grid, unpatchify_grid

LATENT_PATCH = 2  # FLUX.2 packs 2×2 latent pixels into one token


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def vae_downsample_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


Posterior = Literal["sample", "mode"]


def posterior_seed(key: str, seed: int = 0) -> int:
    """The seed of sample `key`'s posterior draw: a hash of (seed, key), so a cache entry never depends on batching."""
    digest = hashlib.sha256(f"asymflow-latent-posterior:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


def posterior_noise(latents: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """n ~ N(0, I) shaped like `latents` [B, ...], image i's drawn on the CPU from `Generator().manual_seed(seeds[i])`
    (so a draw never depends on batching or device), then moved to the latents' device and dtype."""
    noise = torch.stack(
        [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    return noise.to(latents.device, latents.dtype)


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, posterior: Posterior = "mode", seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """RGB images in [−1,1] [B,3,H,W] -> normalised latent grid [B, 4·C_lat, H/(2f), W/(2f)].

    posterior="sample" (what training caches, spec §7): z = μ + σ·n with n ~ N(0, I) drawn on the CPU from
    `torch.Generator().manual_seed(seeds[i])` for image i, so each latent is reproducible from its own seed
    whatever the batch or device. posterior="mode": z = μ (deterministic; e.g. for an autoencoder's
    reconstruction ceiling). The draw is taken before 2×2 packing and normalisation, like the VAE's own sample().
    """
    factor = vae_downsample_factor(vae) * LATENT_PATCH
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by {factor} (VAE factor × latent patch 2)")
    if posterior not in ("sample", "mode"):
        raise ValueError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    latents = dist.mode()
    if posterior == "sample":
        if seeds is None or len(seeds) != images.shape[0]:
            raise ValueError(f"posterior='sample' needs one seed per image ({images.shape[0]}), got {seeds!r}")
        latents = latents + dist.std * posterior_noise(latents, seeds)
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
