"""A family's VAE latents as channel-first latent tokens, and the Procrustes fit of B, s against Oklab pixel tokens."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from asymflow.latents import Posterior, posterior_noise

from asymflow.oklab import oklab_encode
from asymflow.patching import pack, patchify
from asymflow.subspace import ProcrustesFit

from .core import ModelFamily


# VAE classes with a deterministic encoder (diffusers' EncoderOutput.latent, no latent_dist): Sana's DC-AE.
DETERMINISTIC_VAES = ("AutoencoderDC",)


def has_posterior(family: ModelFamily) -> bool:
    """Whether the family's VAE encodes to a distribution (a posterior to sample), not one deterministic latent."""
    return family.vae_class not in DETERMINISTIC_VAES


def _draw(dist, posterior: Posterior, seeds: Sequence[int] | None, frame: bool = False) -> torch.Tensor:
    """The posterior mean, or mean + std·n with n keyed per image by `seeds` (asymflow.latents.posterior_noise, as
    FLUX.2's cache draws); `frame`: the [B,C,T=1,H,W] video latents of Qwen-Image's VAE, frame 0 taken first."""
    mean, std = (dist.mode()[:, :, 0], dist.std[:, :, 0]) if frame else (dist.mode(), dist.std)
    if posterior == "mode":
        return mean
    if posterior != "sample":
        raise ValueError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
    if seeds is None or len(seeds) != mean.shape[0]:
        raise ValueError(f"posterior='sample' needs one seed per image ({mean.shape[0]}), got {seeds!r}")
    return mean + std * posterior_noise(mean, seeds)


@torch.no_grad()
def family_latents(family: ModelFamily, vae, images: torch.Tensor, posterior: Posterior = "mode",
                   seeds: Sequence[int] | None = None) -> torch.Tensor:
    """RGB images in [−1,1] [B,3,H,W] → the family's normalised latent image [B, C_lat, H/f, W/f]: the posterior
    mode, or with posterior="sample" a draw keyed by one seed per image (`asymflow.latents.posterior_seed(key)`).

    "scale_shift": (z − shift_factor)·scaling_factor with the VAE config's factors (FLUX.1, SD3, Sana pipelines);
    "mean_std": (z − latents_mean)/latents_std per channel (Qwen-Image; its VAE encodes [B,3,T=1,H,W] videos).
    """
    param = next(vae.parameters())
    images = images.to(param.device, param.dtype)
    if family.latent_normalisation == "scale_shift":
        encoded = vae.encode(images)
        if hasattr(encoded, "latent_dist"):
            latents = _draw(encoded.latent_dist, posterior, seeds)
        elif posterior == "mode":
            latents = encoded.latent  # DC-AE: a deterministic encoder, no distribution (DETERMINISTIC_VAES)
        else:
            raise ValueError(f"{family.name}'s VAE ({family.vae_class}) has no posterior to sample")
        return (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    if family.latent_normalisation == "mean_std":
        latents = _draw(vae.encode(images[:, :, None]).latent_dist, posterior, seeds, frame=True)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) / std
    raise ValueError(f"{family.name} normalises packed latents; use latent_tokens")


def latent_tokens(family: ModelFamily, vae, images: torch.Tensor, posterior: Posterior = "mode",
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Normalised latent tokens [B, N, C_lat·q²] in channel-first order, on the grid of the p×p pixel patches
    (posterior mode, or keyed samples as in `family_latents`)."""
    p = family.pixel_patch
    if images.shape[-1] % p or images.shape[-2] % p:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the pixel patch {p}")
    if family.latent_normalisation == "batch_norm":
        from asymflow.latents import encode_latents

        # FLUX.2: packed channel-first grid, then its statistics
        return pack(encode_latents(vae, images, posterior, seeds))
    return patchify(family_latents(family, vae, images, posterior, seeds), family.latent_patch, "channel_first")


def pixel_tokens(family: ModelFamily, images: torch.Tensor) -> torch.Tensor:
    """Oklab-encoded pixel tokens [B, N, 3·p²], channel-first (spec §4.2)."""
    return patchify(oklab_encode(images), family.pixel_patch, "channel_first")


def fit_family_subspace(family: ModelFamily, vae, batches: Iterable[torch.Tensor],
                        seeds: Iterable[Sequence[int]] | None = None,
                        latent_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """Procrustes B [3·p², C_lat·q²] (float64) and s from co-located token pairs of image batches in [−1,1].

    Latents are posterior modes, or with `seeds` (one list of per-image seeds per batch, e.g. posterior_seed of the
    sample keys) the keyed posterior samples a `prep cache` stores; `latent_dtype` rounds the latent tokens through
    that dtype first, as a cache of that dtype holds them (so this fit equals `prep subspace` on such a cache).
    """
    fit = ProcrustesFit()
    seed_lists = iter(seeds) if seeds is not None else None
    for images in batches:
        batch_seeds = next(seed_lists) if seed_lists is not None else None
        z = latent_tokens(family, vae, images, "mode" if batch_seeds is None else "sample", batch_seeds)
        if latent_dtype is not None:
            z = z.to(latent_dtype).float()
        fit.update(z.flatten(0, 1), pixel_tokens(family, images).flatten(0, 1))
    return fit.solve()
