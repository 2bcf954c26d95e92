"""FLUX.1 (dev / schnell): FluxTransformer2DModel on 2×2-packed 16-channel latents, T5 + CLIP text, guidance."""
from __future__ import annotations

from .core import ModelFamily, PatchIO

FLUX1 = ModelFamily(
    name="flux1",
    title="FLUX.1",
    transformer_class="FluxTransformer2DModel",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    vae_class="AutoencoderKL",
    latent_channels=16,
    latent_patch=2,  # FluxPipeline._pack_latents: 'b c (h i) (w j) -> b (h w) (c i j)'
    vae_factor=8,
    read_in=PatchIO("x_embedder", "linear", "channel_first"),
    read_out=PatchIO("proj_out", "linear", "channel_first"),
    latent_normalisation="scale_shift",
    vae_factors=(0.3611, 0.1159),
    timestep="sigma",  # the forward multiplies σ (and the guidance scale) by 1000 itself
    text_encoders=("CLIPTextModel (pooled)", "T5EncoderModel"),
    pixel_class_path="asymflow.families.flux1_model:AsymFluxTransformer2DModel",
    latent_config=(("patch_size", (1,)), ("in_channels", (64,)), ("out_channels", (None, 64))),
    full_modules=("x_embedder", "proj_out", "norm_out"),
    # FLUX.2's recipe set on FLUX.1's names: double-block MLPs, timestep embedder, single blocks' fused output.
    lora_targets=(
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
        r"transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)",
        r"time_text_embed\.timestep_embedder\.linear_[12]",
        r"single_transformer_blocks\.\d+\.proj_out",
    ),
)
