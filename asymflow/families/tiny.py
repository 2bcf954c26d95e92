"""Tiny random instances of the non-FLUX.2 families' real diffusers classes, built in code (tests; no downloads)."""
from __future__ import annotations

from typing import Any

import torch

TINY_TEXT_WIDTH = 32
TINY_POOLED_WIDTH = 16

TINY_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "flux1": dict(
        patch_size=1,
        in_channels=64,  # 16 latent channels × 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_WIDTH,
        pooled_projection_dim=TINY_POOLED_WIDTH,
        guidance_embeds=True,  # like FLUX.1-dev
        axes_dims_rope=(4, 6, 6),
    ),
    "sd3": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_WIDTH,
        caption_projection_dim=32,  # = inner width
        pooled_projection_dim=TINY_POOLED_WIDTH,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),  # SD3.5's dual attention in the first block
        qk_norm="rms_norm",  # SD3.5
    ),
    "qwen_image": dict(
        patch_size=2,
        in_channels=64,  # 16 latent channels × 2×2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
    ),
    "sana": dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=TINY_TEXT_WIDTH,
        sample_size=8,
        patch_size=1,
    ),
}


def build_tiny_family_transformer(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random latent transformer of `family` ("flux1" | "sd3" | "qwen_image" | "sana"), deterministic in seed."""
    from .registry import get_family

    if family not in TINY_TRANSFORMER_CONFIGS:
        raise ValueError(f"no tiny config for family {family!r}; have {sorted(TINY_TRANSFORMER_CONFIGS)}")
    cls = get_family(family).transformer_type()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**{**TINY_TRANSFORMER_CONFIGS[family], **overrides})
    return model.eval()


def build_tiny_family_vae(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's VAE class, random: an AutoencoderKL (8× down, 16 channels, no quant convs) with the family's
    released scaling/shift factors, Qwen-Image's AutoencoderKLQwenImage with its latent statistics, or Sana's
    AutoencoderDC (32× down, 32 channels) with its scaling factor."""
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLQwenImage

    from .registry import get_family

    spec = get_family(family)
    if spec.vae_class == "AutoencoderDC":  # 32× down: six stages
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderDC(latent_channels=spec.latent_channels, attention_head_dim=8,
                                encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                                decoder_block_out_channels=(8, 8, 16, 16, 32, 32), encoder_layers_per_block=(1,) * 6,
                                decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
                                decoder_qkv_multiscales=((),) * 6, scaling_factor=spec.vae_factors[0])
        return vae.eval()
    if spec.vae_class == "AutoencoderKLQwenImage":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(base_dim=8, z_dim=spec.latent_channels, dim_mult=[1, 2, 2, 2],
                                         num_res_blocks=1, temperal_downsample=[False, False, False])
        return vae.eval()
    if spec.vae_class != "AutoencoderKL" or spec.vae_factors is None:
        raise ValueError(f"family {family!r} does not use a scaled AutoencoderKL")
    scaling, shift = spec.vae_factors
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=spec.latent_channels,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
            scaling_factor=scaling,
            shift_factor=shift,
        )
    return vae.eval()
