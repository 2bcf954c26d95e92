"""Text-to-image pipeline for the pixel AsymFlow model of any non-FLUX.2 family (FLUX.1, SD3, Qwen-Image, Sana).

One class for all four: the family comes from the transformer (`transformer.family()`), and so do the text components
it needs (the family's diffusers pipeline's names: FLUX.1 tokenizer/text_encoder (CLIP) + tokenizer_2/text_encoder_2
(T5), SD3 the same plus tokenizer_3/text_encoder_3, Qwen-Image and Sana tokenizer/text_encoder) and its sampler
defaults (`ModelFamily.sampler`: steps, σ grid and shift, CFG convention). Prompts are encoded by
`encode_family_prompts` (bit for bit the diffusers pipeline's `encode_prompt`) and sampled by
`families.sampling.sample_family`; the pipeline adds only noise drawing, batching and the [−1,1] → PIL/np/pt step.
FLUX.2 has its own pipeline (asymflow.pipeline.AsymFlux2KleinPipeline).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from asymflow.pipeline import AsymFlowPipelineOutput, Generator, OutputType
from asymflow.pipeline_files import has_own_shim, write_custom_pipeline_files
from asymflow.timesteps import resolve_shift

# diffusers resolves a saved transformer's module ("asymflow.families.flux1_model") from sys.modules only: importing
# this module (as the saved directory's shim does) makes every family's pixel class loadable.
from . import flux1_model, qwen_image_model, sana_model, sd3_model  # noqa: F401
from .core import ModelFamily
from .load import text_component_names
from .pixel import AsymFlowPixelMixin
from .sampling import family_sigmas, sample_family
from .text import encode_family_prompts, sampling_inputs

Encoded = dict[str, torch.Tensor]
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
DEFAULT_SIZE = 1024  # FluxPipeline, StableDiffusion3Pipeline, QwenImagePipeline and SanaPipeline (1024 px models)


def cfg_convention(family: ModelFamily) -> str:
    """How the family guides, in words (metadata, --help)."""
    d = family.sampler
    if d.embedded_guidance is not None:
        true_cfg = "off" if d.cfg_scale == 1.0 else f"{d.cfg_scale:g}"
        return f"guidance-distilled: guidance input {d.embedded_guidance:g}, true CFG {true_cfg}"
    return f"true CFG {d.cfg_scale:g}" + (", renormalised per token" if d.cfg_renorm else "")


def sampler_summary(family: ModelFamily) -> str:
    """'28 steps, true CFG 7, σ grid train_range (shift 3)' — the family's defaults in one line."""
    d = family.sampler
    shift = f"shift {d.shift:g}" if isinstance(d.shift, (int, float)) else "resolution-dependent shift"
    terminal = f", terminal σ {d.shift_terminal:g}" if d.shift_terminal is not None else ""
    return f"{d.steps} steps, {cfg_convention(family)}, Euler on the {d.grid} σ grid ({shift}{terminal})"


class AsymFlowFamilyPipeline(DiffusionPipeline):
    """Text-to-image with a non-FLUX.2 family's pixel transformer: family prompt encoding → `sample_family`.

    Components: transformer (the family's pixel class, e.g. AsymSD3Transformer2DModel) and the family's text
    components under its diffusers pipeline's names (all optional: pass `encoded_prompt` instead; the ones the family
    does not use stay None). `save_pretrained` / `from_pretrained` round-trip it, and so does diffusers'
    `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` (a custom-pipeline shim, as for FLUX.2).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer"
    _optional_components = list(TEXT_COMPONENTS)

    def __init__(self, transformer: torch.nn.Module, tokenizer=None, text_encoder: torch.nn.Module | None = None,
                 tokenizer_2=None, text_encoder_2: torch.nn.Module | None = None, tokenizer_3=None,
                 text_encoder_3: torch.nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(transformer, AsymFlowPixelMixin):
            raise TypeError(f"transformer must be a family's pixel model (families.pixel.AsymFlowPixelMixin), got "
                            f"{type(transformer).__name__}; FLUX.2 uses asymflow.pipeline.AsymFlux2KleinPipeline")
        given = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                     text_encoder_2=text_encoder_2, tokenizer_3=tokenizer_3, text_encoder_3=text_encoder_3)
        family = transformer.family()
        foreign = [name for name, part in given.items() if part is not None and name not in self.text_names(family)]
        if foreign:
            raise ValueError(f"the {family.title} pipeline has no text component {', '.join(foreign)}; it takes "
                             f"{', '.join(self.text_names(family))}")
        self.register_modules(transformer=transformer, **given)
        self.image_processor = VaeImageProcessor(do_normalize=True)  # [−1,1] → [0,1] → pt / np / PIL

    @staticmethod
    def text_names(family: ModelFamily) -> tuple[str, ...]:
        return text_component_names(family.name)

    @property
    def family(self) -> ModelFamily:
        return self.transformer.family()

    @classmethod
    def with_base_text(cls, transformer: AsymFlowPixelMixin, base: str | PathLike) -> AsymFlowFamilyPipeline:
        """The pipeline of `transformer` with the text components of the family's diffusers pipeline directory
        `base` (the latent base an adapter, merged model or run was converted from)."""
        from .load import load_pipeline_components

        return cls(transformer, **load_pipeline_components(base, text_component_names(transformer.family().name)))

    def save_pretrained(self, save_directory: str | PathLike, *args, **kwargs) -> None:
        """diffusers' save plus the shim that lets `DiffusionPipeline.from_pretrained` find this class."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_custom_pipeline_files(save_directory, type(self).__name__, __name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PathLike, **kwargs):
        """diffusers' load; a directory whose custom-pipeline file is exactly our shim needs no trust_remote_code."""
        if has_own_shim(pretrained_model_name_or_path, cls.__name__, __name__):
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def encode_prompt(self, prompt: str | Sequence[str], negative: bool = False, num_images_per_prompt: int = 1,
                      device: torch.device | None = None, **options: Any) -> Encoded:
        """Prompts → the family's text conditioning (`encode_family_prompts`: encoder_hidden_states and the
        family's extra tensors), repeated per image, floating tensors in the transformer's dtype. `negative=True`
        encodes as the pipeline does negatives for true CFG; `options`: max_sequence_length, clip_skip (sd3),
        complex_human_instruction (sana)."""
        family = self.family
        parts = {name: getattr(self, name, None) for name in self.text_names(family)}
        encoded = encode_family_prompts(family.name, parts, prompt, negative=negative, **options)
        device = self._execution_device if device is None else device
        dtype = self.transformer.dtype
        return {name: t.repeat_interleave(num_images_per_prompt, dim=0).to(
                    device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                for name, t in encoded.items()}

    def noise(self, batch: int, height: int, width: int, generator: Generator | None) -> torch.Tensor:
        """N(0, 1) [B,3,H,W] on the CPU in the sampler's algebra dtype, as `sample_family` draws it from a seed (a
        list of generators: one image each)."""
        dtype = torch.float64 if self.transformer.proj_buffer.dtype == torch.float64 else torch.float32
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} images")
            return torch.cat([torch.randn((1, 3, height, width), generator=g, dtype=dtype) for g in generator])
        return torch.randn((batch, 3, height, width), generator=generator, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        embedded_guidance: float | None = None,
        generator: Generator | None = None,
        num_images_per_prompt: int = 1,
        output_type: OutputType = "pil",
        encoded_prompt: Mapping[str, torch.Tensor] | None = None,
        encoded_negative: Mapping[str, torch.Tensor] | None = None,
        latents: torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        text_options: Mapping[str, Any] | None = None,
        return_dict: bool = True,
    ) -> AsymFlowPipelineOutput | tuple:
        """Generate images with the family's sampler; None arguments take the family's defaults
        (`transformer.family().sampler`, from its diffusers pipeline).

        guidance_scale: true CFG u_u + w·(u_c − u_u) on the backbone output (Qwen-Image: renormalised per token to
        the conditional norm; 1 = off, the default for FLUX.1); the negative prompt is encoded only when it is ≠ 1.
        embedded_guidance: the guidance value a guidance-distilled FLUX.1 (dev) takes as input (default 3.5;
        FluxPipeline's `guidance_scale`). height/width: multiples of the pixel patch (16; Sana 32), default 1024.
        generator: CPU generator(s) the starting noise is drawn from (`latents` [B,3,H,W] replaces it); `sigmas` a σ
        grid (decreasing, no final 0) replacing the family's. encoded_prompt / encoded_negative: `encode_prompt`'s
        output instead of prompts. text_options: `encode_family_prompts` options (max_sequence_length, clip_skip,
        complex_human_instruction). output_type "pil" | "np" | "pt" (images in [0,1]) | "latent" (the final
        normalised-Oklab sample). The output's `nfe` counts steps (a CFG pair once) and `sigmas` the grid with 0.
        """
        family, options = self.family, dict(text_options or {})
        defaults = family.sampler
        scale = defaults.cfg_scale if guidance_scale is None else float(guidance_scale)
        steps = defaults.steps if num_inference_steps is None else int(num_inference_steps)
        height, width = height or DEFAULT_SIZE, width or DEFAULT_SIZE
        def repeat(encoded: Mapping[str, torch.Tensor]) -> Encoded:
            return {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in encoded.items()}

        if encoded_prompt is None:
            if prompt is None:
                raise ValueError("pass either prompt or encoded_prompt")
            encoded_prompt = self.encode_prompt(prompt, False, num_images_per_prompt, **options)
        else:
            encoded_prompt = repeat(encoded_prompt)
        batch = encoded_prompt["encoder_hidden_states"].shape[0]
        if encoded_negative is None and scale != 1.0:
            count = batch // num_images_per_prompt
            negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
            encoded_negative = self.encode_prompt(negatives, True, num_images_per_prompt, **options)
        elif encoded_negative is not None:
            encoded_negative = repeat(encoded_negative)
        p = self.transformer.config.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            raise ValueError(f"height={height} and width={width} must be positive multiples of the {family.title} "
                             f"pixel patch {p}")
        noise = self.noise(batch, height, width, generator) if latents is None else latents
        if sigmas is None:
            grid = family_sigmas(defaults, steps, (height // p) * (width // p))
        else:
            grid = torch.as_tensor(sigmas, dtype=torch.float64)
        images = sample_family(
            self.transformer, **sampling_inputs(encoded_prompt, encoded_negative if scale != 1.0 else None),
            height=height, width=width, guidance_scale=scale, embedded_guidance=embedded_guidance, noise=noise,
            sigmas=grid, decode=output_type != "latent",
        )
        if output_type != "latent":
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return AsymFlowPipelineOutput(images=images, nfe=len(grid), sigmas=[float(s) for s in grid] + [0.0])

    def sampler_settings(self, height: int, width: int, num_inference_steps: int | None = None,
                         guidance_scale: float | None = None, embedded_guidance: float | None = None) -> dict[str, Any]:
        """What a call with these arguments samples with, defaults resolved (PNG metadata, `asymflow sample`)."""
        family = self.family
        d = family.sampler
        distilled = bool(getattr(self.transformer.config, "guidance_embeds", False))
        steps = d.steps if num_inference_steps is None else num_inference_steps
        p = self.transformer.config.patch_size
        return {
            "family": family.name, "integrator": "euler", "sigma_grid": d.grid,
            "shift": float(resolve_shift(d.shift, (height // p) * (width // p))), "shift_terminal": d.shift_terminal,
            "steps": steps, "guidance": d.cfg_scale if guidance_scale is None else guidance_scale,
            "cfg_renorm": d.cfg_renorm,
            "embedded_guidance": (d.embedded_guidance if embedded_guidance is None else embedded_guidance)
            if distilled else None,
            "defaults_from": d.source,
        }


__all__ = ["AsymFlowFamilyPipeline", "cfg_convention", "sampler_summary"]
