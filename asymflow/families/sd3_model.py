"""The SD3 pixel model: AsymSD3Transformer2DModel."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config

from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2
from asymflow.patching import patchify, unpatchify

from .pixel import AsymFlowPixelMixin


class AsymSD3Transformer2DModel(AsymFlowPixelMixin, SD3Transformer2DModel):
    """The SD3 transformer on 16×16 pixel patches with the AsymFlow parameterisation.

    `pos_embed.proj` is a Conv2d(3 → inner, 16, stride 16) (= a linear on channel-first pixel patches), `proj_out`
    Linear(inner → 768) writes channel-last patches like SD3's unpatchify; `sample_size` is in pixels (the latent
    model's × VAE factor), so the positional embedding's base size is the latent model's. Conditioning:
    `pooled_projections` [B, pooled_projection_dim] (both CLIPs' pooled outputs), optional `skip_layers`.
    """

    family_name = "sd3"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 1024,
        patch_size: int = 16,
        in_channels: int = 3,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 3,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        base_rank: int = 64,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        num_timesteps: int = 1,
    ):
        self.init_pixel_backbone(SD3Transformer2DModel, locals())

    @classmethod
    def pixel_overrides(cls, latent_config: Mapping[str, Any]) -> dict[str, Any]:
        # PatchEmbed's base size is sample_size / patch: keep it, so the positional embedding buffer is the same.
        return {"sample_size": latent_config.get("sample_size", 128) * cls.family().vae_factor}

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int],
        pooled_projections: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        skip_layers: list[int] | None = None,
    ) -> torch.Tensor:
        if pooled_projections is None:
            raise ValueError("SD3 needs pooled_projections [B, pooled_projection_dim] (the CLIP pooled outputs)")
        p, dtype = self.config.patch_size, self.dtype
        (h, w), family = grid, self.family()
        # SD3 patches the image with its conv and unpatchifies its output itself: pixel tokens go through as images.
        image = unpatchify(hidden_states.to(dtype), p, h * p, w * p, "channel_first")
        out = SD3Transformer2DModel.forward(
            self,
            hidden_states=image,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            pooled_projections=pooled_projections.to(dtype),
            timestep=sigma_cal * family.timestep_scale,
            joint_attention_kwargs=joint_attention_kwargs,
            skip_layers=skip_layers,
            return_dict=False,
        )[0]
        return patchify(out, p, "channel_first")
