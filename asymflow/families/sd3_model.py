"""The SD3 pixel model: AsymSD3Transformer2DModel."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config

from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2

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
        return self.run_on_image(
            SD3Transformer2DModel.forward,
            hidden_states,
            grid,
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            pooled_projections=pooled_projections.to(self.dtype),
            timestep=sigma_cal * self.family().timestep_scale,
            joint_attention_kwargs=joint_attention_kwargs,
            skip_layers=skip_layers,
        )
