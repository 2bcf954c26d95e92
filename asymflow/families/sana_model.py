"""The Sana pixel model: AsymSanaTransformer2DModel."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config

from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2

from .pixel import AsymFlowPixelMixin


class AsymSanaTransformer2DModel(AsymFlowPixelMixin, SanaTransformer2DModel):
    """The Sana transformer on 32×32 pixel patches (D = 3072) with the AsymFlow parameterisation.

    `patch_embed.proj` is a Conv2d(3 → inner, 32, stride 32) (= a linear on channel-first pixel patches), `proj_out`
    Linear(inner → 3072) writes channel-last patches like Sana's unpatchify; `sample_size` is in pixels (the latent
    model's × 32). Conditioning: `encoder_attention_mask` [B, L] (the text mask, optional), `guidance` [B].
    """

    family_name = "sana"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = 3,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 1024,
        patch_size: int = 32,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        base_rank: int = 32,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        num_timesteps: int = 1,
    ):
        self.init_pixel_backbone(SanaTransformer2DModel, locals())

    def rebuild_unsaved_state(self) -> None:
        # A sincos positional table (interpolation_scale set) is a non-persistent buffer: rebuilt as PatchEmbed does.
        embed = self.patch_embed
        if getattr(embed, "pos_embed", None) is not None and embed.pos_embed.is_meta:
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            table = get_2d_sincos_pos_embed(embed.pos_embed.shape[-1], (embed.height, embed.width),
                                            base_size=embed.base_size, interpolation_scale=embed.interpolation_scale,
                                            output_type="pt")
            embed.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=False)

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int],
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        return self.run_on_image(
            SanaTransformer2DModel.forward,
            hidden_states,
            grid,
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            timestep=sigma_cal * self.family().timestep_scale * self.config.timestep_scale,
            guidance=guidance,
            encoder_attention_mask=encoder_attention_mask,
            attention_kwargs=attention_kwargs,
        )
