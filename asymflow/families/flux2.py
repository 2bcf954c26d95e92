"""FLUX.2 (klein): the project's first family; its pixel model and conversion live in asymflow.model / convert."""
from __future__ import annotations

from asymflow.trainable import FLUX2_LORA_TARGETS, FULL_MODULES

from .core import ModelFamily, PatchIO

FLUX2 = ModelFamily(
    name="flux2",
    title="FLUX.2 (klein)",
    transformer_class="Flux2Transformer2DModel",
    pipeline_classes=("Flux2KleinPipeline", "Flux2Pipeline"),
    vae_class="AutoencoderKLFlux2",
    latent_channels=32,
    latent_patch=2,  # asymflow.latents: 2×2 packing channel-first, then batch-norm statistics
    vae_factor=8,
    read_in=PatchIO("x_embedder", "linear", "channel_first"),
    read_out=PatchIO("proj_out", "linear", "channel_first"),
    latent_normalisation="batch_norm",
    vae_factors=None,
    timestep="sigma",
    text_encoders=("Qwen3ForCausalLM (hidden states of 3 layers)",),
    pixel_class_path="asymflow.model:AsymFlux2Transformer2DModel",
    latent_config=(("patch_size", (1,)), ("in_channels", (128,)), ("out_channels", (None, 128))),
    full_modules=FULL_MODULES,
    lora_targets=FLUX2_LORA_TARGETS,
)
