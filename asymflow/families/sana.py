"""Sana: SanaTransformer2DModel on 32-channel latents of the 32× DC-AE (patch 1), Gemma-2 text: pixel patch 32."""
from __future__ import annotations

from .core import ModelFamily, PatchIO, SamplerDefaults

SANA = ModelFamily(
    name="sana",
    title="Sana",
    transformer_class="SanaTransformer2DModel",
    pipeline_classes=("SanaPipeline", "SanaPAGPipeline"),
    vae_class="AutoencoderDC",
    latent_channels=32,
    latent_patch=1,  # one latent pixel per token: D = 3·32² = 3072, r = 32
    vae_factor=32,
    read_in=PatchIO("patch_embed.proj", "conv", "channel_first"),  # PatchEmbed: Conv2d(32 → inner, 1, stride 1)
    # Sana's unpatchify reads proj_out's features as (i, j, c): channel-last, like SD3.
    read_out=PatchIO("proj_out", "linear", "channel_last"),
    latent_normalisation="scale_shift",  # DC-AE: z·scaling_factor, no shift, deterministic encoder
    vae_factors=(0.41407, 0.0),
    timestep="t1000",  # SanaPipeline passes t = 1000·σ, times config.timestep_scale
    text_stream="cross",  # SanaTransformerBlock: self-attention on image tokens, cross-attention to the text
    text_encoders=("Gemma2Model (last hidden state, masked, with a complex human instruction)",),
    pixel_class_path="asymflow.families.sana_model:AsymSanaTransformer2DModel",
    latent_config=(("patch_size", (1,)), ("in_channels", (32,)), ("out_channels", (None, 32))),
    full_modules=("patch_embed.proj", "proj_out", "scale_shift_table"),  # Sana's output modulation is a parameter
    # FLUX.2's recipe set on Sana's names: the Mix-FFN, the timestep embedder, self-attention output.
    # diffusers/pipelines/sana/pipeline_sana.py (20 steps, guidance_scale 4.5 as true CFG); Sana's scheduler is
    # DPM-Solver++ with flow_shift 3: its σ grid here, integrated with Euler (families.sampling)
    sampler=SamplerDefaults(steps=20, cfg_scale=4.5, shift=3.0, grid="dpm_flow",
                            source="diffusers/pipelines/sana/pipeline_sana.py"),
    text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
    text_mask="encoder_attention_mask",
    lora_targets=(
        r"transformer_blocks\.\d+\.ff\.conv_(inverted|point)",
        r"time_embed\.emb\.timestep_embedder\.linear_[12]",
        r"transformer_blocks\.\d+\.attn1\.to_out\.0",
    ),
)
