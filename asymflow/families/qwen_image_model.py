"""The Qwen-Image pixel model: AsymQwenImageTransformer2DModel."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope

from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2

from .pixel import AsymFlowPixelMixin


class AsymQwenImageTransformer2DModel(AsymFlowPixelMixin, QwenImageTransformer2DModel):
    """The Qwen-Image transformer on 16×16 pixel patches (D = 768) with the AsymFlow parameterisation.

    Differs from the latent model only in `img_in: Linear(768 → inner)` (bias kept), `proj_out: Linear(inner →
    768)` and the B, s buffers. Conditioning: `encoder_hidden_states_mask` [B, L] (the text mask, optional).
    """

    family_name = "qwen_image"

    @register_to_config
    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        out_channels: int | None = 3,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        base_rank: int = 64,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        num_timesteps: int = 1,
    ):
        self.init_pixel_backbone(QwenImageTransformer2DModel, locals())

    def rebuild_unsaved_state(self) -> None:
        # The RoPE tables are plain tensor attributes (not buffers): built here as QwenImageTransformer2DModel does.
        rope = QwenEmbedLayer3DRope if self.config.use_layer3d_rope else QwenEmbedRope
        self.pos_embed = rope(theta=10000, axes_dim=list(self.config.axes_dims_rope), scale_rope=True)

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int],
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        dtype = self.dtype
        return QwenImageTransformer2DModel.forward(
            self,
            hidden_states=hidden_states.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            timestep=sigma_cal,
            img_shapes=[[(1, *grid)]] * hidden_states.shape[0],  # one frame of h×w tokens per sample
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
