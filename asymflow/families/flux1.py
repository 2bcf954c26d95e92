"""FLUX.1 (dev / schnell): FluxTransformer2DModel on 2×2-packed 16-channel latents, T5 + CLIP text, guidance."""
from __future__ import annotations

import math

from asymflow.timesteps import DynamicShift

from .core import ModelFamily, PatchIO, SamplerDefaults

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
    # diffusers/pipelines/flux/pipeline_flux.py (FluxPipeline.__call__ defaults: 28 steps, guidance_scale 3.5 into the
    # guidance embedding, true_cfg_scale 1; sigmas linspace(1, 1/n, n) shifted by exp(calculate_shift(tokens)) with
    # FLUX.1-dev's scheduler config: base/max_image_seq_len 256/4096, base/max_shift 0.5/1.15)
    sampler=SamplerDefaults(
        steps=28,
        cfg_scale=1.0,
        shift=DynamicShift("exp", base_len=256, max_len=4096, base_shift=math.exp(0.5), max_shift=math.exp(1.15)),
        embedded_guidance=3.5,
        source="diffusers/pipelines/flux/pipeline_flux.py",
    ),
    text_inputs=("encoder_hidden_states", "pooled_projections"),
    lora_targets=(
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
        r"transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)",
        r"time_text_embed\.timestep_embedder\.linear_[12]",
        r"single_transformer_blocks\.\d+\.proj_out",
    ),
)
