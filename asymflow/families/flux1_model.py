"""The FLUX1 pixel model: AsymFluxTransformer2DModel."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config

from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2

from .pixel import AsymFlowPixelMixin


def flux1_image_ids(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """FLUX.1 RoPE ids (0, row, col) of an h×w token grid: [h·w, 3] (FluxPipeline._prepare_latent_image_ids)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


class AsymFluxTransformer2DModel(AsymFlowPixelMixin, FluxTransformer2DModel):
    """The FLUX.1 transformer on 16×16 pixel patches (D = 768) with the AsymFlow parameterisation.

    Differs from the latent model only in `x_embedder: Linear(768 → inner)` (bias kept), `proj_out:
    Linear(inner → 768)` and the B, s buffers. Conditioning: `pooled_projections` [B, pooled_projection_dim]
    (CLIP), `guidance` [B] (the guidance scale, for guidance-distilled models), `txt_ids` [L,3] (default zeros).
    """

    family_name = "flux1"

    @register_to_config
    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        base_rank: int = 64,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        num_timesteps: int = 1,
    ):
        self.init_pixel_backbone(FluxTransformer2DModel, locals())

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int],
        pooled_projections: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        txt_ids: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if pooled_projections is None:
            raise ValueError("FLUX.1 needs pooled_projections [B, pooled_projection_dim] (the CLIP pooled output)")
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("this FLUX.1 model is guidance-distilled: pass guidance (the guidance scale)")
        device, dtype = hidden_states.device, self.dtype
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=device).expand(hidden_states.shape[0])
        if txt_ids is None:
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=device)
        return FluxTransformer2DModel.forward(
            self,
            hidden_states=hidden_states.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            pooled_projections=pooled_projections.to(dtype),
            timestep=sigma_cal,
            img_ids=flux1_image_ids(*grid, device=device),
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=False,
        )[0]
