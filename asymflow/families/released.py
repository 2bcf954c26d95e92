"""The released checkpoints of the non-FLUX.2 families at their real sizes: each one's diffusers transformer config,
for building the latent and the converted pixel model on the meta device (no memory, no download) — the dry run's
memory model, docs/SCALING.md's per-family table and the example configs (configs/<family>-*.yaml) count them.
FLUX.2 klein's are in asymflow.klein.

Each entry cites where its config comes from (the hub's transformer/config.json as diffusers' own conversion script
writes it) and the size its publisher states; tests/asymflow/test_released_meta.py checks the count of the built
model against that size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .registry import get_family


@dataclass(frozen=True)
class ReleasedCheckpoint:
    name: str
    family: str
    repo: str  # hub id of the diffusers pipeline
    config: dict[str, Any]  # transformer/config.json (keys at their class defaults left out)
    published_b: float  # the size its publisher states, in billions of weights
    source: str


RELEASED: dict[str, ReleasedCheckpoint] = {r.name: r for r in (
    ReleasedCheckpoint(
        "flux1-dev", "flux1", "black-forest-labs/FLUX.1-dev",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        11.9,  # "a 12 billion parameter rectified flow transformer" (model card); 11.90 B counted
        "black-forest-labs/FLUX.1-dev transformer/config.json (guidance_embeds true: dev is guidance-distilled); "
        "diffusers scripts/convert_flux_to_diffusers.py converts with the same 19 double + 38 single blocks, width "
        "3072, MLP ratio 4",
    ),
    ReleasedCheckpoint(
        "sd3.5-large", "sd3", "stabilityai/stable-diffusion-3.5-large",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
             dual_attention_layers=()),
        8.1,  # "8.1 billion parameters" (model card): 8.06 B parameters + the 192²×2432 positional table (buffer)
        "stabilityai/stable-diffusion-3.5-large transformer/config.json; diffusers scripts/convert_sd3_to_diffusers.py "
        "derives the same (heads = layers, caption_projection_dim = 64·layers, pos_embed_max_size 192, rms qk-norm)",
    ),
    ReleasedCheckpoint(
        "sd3.5-medium", "sd3", "stabilityai/stable-diffusion-3.5-medium",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13))),
        2.5,  # "2.5 billion parameters" (model card): 2.24 B parameters + the 384²×1536 positional table (buffer)
        "stabilityai/stable-diffusion-3.5-medium transformer/config.json; diffusers scripts/convert_sd3_to_diffusers.py "
        "(MMDiT-X: dual attention in blocks 0–12, pos_embed_max_size 384)",
    ),
    ReleasedCheckpoint(
        "qwen-image", "qwen_image", "Qwen/Qwen-Image",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        20.0,  # "a 20B MMDiT image foundation model" (model card); 20.43 B counted
        "Qwen/Qwen-Image transformer/config.json (its pooled_projection_dim 768 is not an argument of "
        "QwenImageTransformer2DModel and is ignored by diffusers)",
    ),
    ReleasedCheckpoint(
        "sana-1600m", "sana", "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
             num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
             caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
             norm_elementwise_affine=False, norm_eps=1e-6),
        1.6,  # Sana-1.6B (model card); 1.60 B counted
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json, as diffusers "
        "scripts/convert_sana_to_diffusers.py writes it for SanaMS_1600M_P1_D20 at 1024 px (sample_size 1024/32)",
    ),
)}


def released(name: str) -> ReleasedCheckpoint:
    if name not in RELEASED:
        raise ValueError(f"unknown released checkpoint {name!r}; known: {', '.join(RELEASED)}")
    return RELEASED[name]


def _built(cls: type, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 intermediate
    try:
        with torch.device(device):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_released_transformer(name: str, device: str | torch.device = "meta",
                               dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The latent transformer of released checkpoint `name` (real diffusers class), random or (meta) no weights."""
    entry = released(name)
    return _built(get_family(entry.family).transformer_type(), entry.config, device, dtype)


def build_pixel_from_latent_config(family: str, latent_config: Any, device: str | torch.device = "meta",
                                   dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The family's pixel AsymFlow model for a latent config (the converted model's shapes; on meta, no weights):
    what `conversion.convert_family_transformer` builds, without the weight surgery."""
    cls = get_family(family).pixel_class()
    return _built(cls, cls.from_latent_config(latent_config), device, dtype)


def build_released_pixel(name: str, device: str | torch.device = "meta",
                         dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The converted pixel model of released checkpoint `name`."""
    entry = released(name)
    return build_pixel_from_latent_config(entry.family, entry.config, device, dtype)
