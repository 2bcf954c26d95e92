"""Qwen-Image: QwenImageTransformer2DModel on 2×2-packed 16-channel latents of its own 3D VAE, Qwen2.5-VL text."""
from __future__ import annotations

import math

from asymflow.timesteps import DynamicShift

from .core import ModelFamily, PatchIO, SamplerDefaults

QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    title="Qwen-Image",
    transformer_class="QwenImageTransformer2DModel",
    pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
    vae_class="AutoencoderKLQwenImage",
    latent_channels=16,
    latent_patch=2,  # QwenImagePipeline._pack_latents: 'b c (h i) (w j) -> b (h w) (c i j)', like FLUX.1
    vae_factor=8,
    read_in=PatchIO("img_in", "linear", "channel_first"),
    read_out=PatchIO("proj_out", "linear", "channel_first"),
    latent_normalisation="mean_std",
    vae_factors=None,
    timestep="sigma",  # the pipeline passes t/1000 = σ; the time embedding scales it by 1000 itself
    text_encoders=("Qwen2_5_VLForConditionalGeneration (last hidden state, masked)",),
    pixel_class_path="asymflow.families.qwen_image_model:AsymQwenImageTransformer2DModel",
    # in_channels is the packed width, out_channels the latent channels (proj_out writes p²·out_channels)
    latent_config=(("patch_size", (2,)), ("in_channels", (64,)), ("out_channels", (16,))),
    full_modules=("img_in", "proj_out", "norm_out"),
    # FLUX.2's recipe set on Qwen-Image's names (dual-stream blocks only: image and text MLPs, attention output).
    # diffusers/pipelines/qwenimage/pipeline_qwenimage.py (50 steps, true_cfg_scale 4 with the combined prediction
    # rescaled per token to the conditional one's norm; sigmas linspace(1, 1/n, n) shifted by exp(calculate_shift)
    # with Qwen-Image's scheduler config: base/max_image_seq_len 256/8192, base/max_shift 0.5/0.9, shift_terminal 0.02)
    sampler=SamplerDefaults(
        steps=50,
        cfg_scale=4.0,
        shift=DynamicShift("exp", base_len=256, max_len=8192, base_shift=math.exp(0.5), max_shift=math.exp(0.9)),
        shift_terminal=0.02,
        cfg_renorm=True,
        source="diffusers/pipelines/qwenimage/pipeline_qwenimage.py",
    ),
    text_inputs=("encoder_hidden_states", "encoder_hidden_states_mask"),
    text_mask="encoder_hidden_states_mask",
    lora_targets=(
        r"transformer_blocks\.\d+\.img_mlp\.net\.(0\.proj|2)",
        r"transformer_blocks\.\d+\.txt_mlp\.net\.(0\.proj|2)",
        r"time_text_embed\.timestep_embedder\.linear_[12]",
        r"transformer_blocks\.\d+\.attn\.to_out\.0",
    ),
)
