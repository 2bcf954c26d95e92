"""SD3 / SD3.5: SD3Transformer2DModel with a conv patch embedding (patch 2) on 16-channel latents, t = 1000·σ."""
from __future__ import annotations

from .core import ModelFamily, PatchIO, SamplerDefaults

SD3 = ModelFamily(
    name="sd3",
    title="Stable Diffusion 3 / 3.5",
    transformer_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    vae_class="AutoencoderKL",
    latent_channels=16,
    latent_patch=2,
    vae_factor=8,
    read_in=PatchIO("pos_embed.proj", "conv", "channel_first"),  # PatchEmbed: Conv2d(16 → inner, 2, stride 2)
    # SD3's unpatchify reads proj_out's features as 'nhwpqc': (i, j, c), i.e. channel-last.
    read_out=PatchIO("proj_out", "linear", "channel_last"),
    latent_normalisation="scale_shift",
    vae_factors=(1.5305, 0.0609),
    timestep="t1000",
    extra_text_tokens=77,  # encoder_hidden_states = CLIP-L ‖ CLIP-G (77 tokens, padded to 4096) then T5 (families.text)
    text_encoders=("CLIPTextModelWithProjection (L)", "CLIPTextModelWithProjection (G)", "T5EncoderModel"),
    pixel_class_path="asymflow.families.sd3_model:AsymSD3Transformer2DModel",
    latent_config=(("patch_size", (2,)), ("in_channels", (16,)), ("out_channels", (None, 16))),
    full_modules=("pos_embed.proj", "proj_out", "norm_out"),
    # FLUX.2's recipe set on SD3's names (no single blocks: the joint blocks' attention output instead).
    # diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py (28 steps, guidance_scale 7 as true CFG
    # uncond + w·(text − uncond)); the grid is FlowMatchEulerDiscreteScheduler.set_timesteps(n) with SD3/SD3.5's
    # static shift 3
    sampler=SamplerDefaults(steps=28, cfg_scale=7.0, shift=3.0, grid="train_range",
                            source="diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py"),
    text_inputs=("encoder_hidden_states", "pooled_projections"),
    lora_targets=(
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
        r"transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)",
        r"time_text_embed\.timestep_embedder\.linear_[12]",
        r"transformer_blocks\.\d+\.attn\.to_out\.0",
    ),
)
