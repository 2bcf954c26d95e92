"""FLUX.2 klein transformer configs at their real sizes (the diffusers `Flux2Transformer2DModel` configs of
black-forest-labs/FLUX.2-klein-4B and -9B), for building the big models on the meta device and for benchmarks."""
from __future__ import annotations

from typing import Any

import torch

KLEIN_COMMON: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,  # 32 VAE channels × 2×2 packing
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
KLEIN_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    # text width = 3 stacked Qwen3 hidden-state layers: Qwen3-4B (2560) for 4B, Qwen3-8B (4096) for 9B
    "4b": dict(KLEIN_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
               joint_attention_dim=7680),
    "9b": dict(KLEIN_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128,
               joint_attention_dim=12288),
}


def build_klein_transformer(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16):
    """The latent klein transformer `name` ("4b" | "9b") with random (or, on meta, no) weights."""
    from diffusers import Flux2Transformer2DModel

    if name not in KLEIN_TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown klein size {name!r}; expected one of {sorted(KLEIN_TRANSFORMER_CONFIGS)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 intermediate (and no `.to()` cast warning)
    try:
        with torch.device(device):
            model = Flux2Transformer2DModel(**KLEIN_TRANSFORMER_CONFIGS[name])
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
