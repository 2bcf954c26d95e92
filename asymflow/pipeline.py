"""AsymFLUX.2 klein text-to-image pipeline and the one sampling loop it shares with training-time samples (spec §11)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from dataclasses import dataclass, replace
from typing import Literal

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import Flux2LoraLoaderMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .adaptive import AdaptiveConfig, SamplingReport, sample_adaptive
from .guidance import guidance_scale_at, guided_velocity
from .oklab import OKLAB_MEAN, OKLAB_STD, oklab_decode
from .pipeline_files import has_own_shim, write_custom_pipeline_files
from .reference import ReferenceImage, prepare_references
from .scheduler import FlowAdapterScheduler
from .text import KLEIN_HIDDEN_LAYERS, KLEIN_MAX_LENGTH, encode_prompts
from .timesteps import DynamicShift

logger = logging.get_logger(__name__)

PIXEL_MULTIPLE = 16  # one transformer token = one 16×16 pixel patch
OutputType = Literal["pil", "np", "pt", "latent"]
Generator = torch.Generator | list[torch.Generator]
Sampler = Literal["fixed", "adaptive"]
# step_callback(i, σ_i, x after step i) -> the sample to continue from (the callback may replace it)
StepCallback = Callable[[int, float, torch.Tensor], torch.Tensor]


def floor_to_multiple(height: int, width: int, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int]:
    """(H, W) floored to multiples of `multiple`, with a warning when that changes them."""
    h, w = height // multiple * multiple, width // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"height={height} and width={width} must be at least {multiple}")
    if (h, w) != (height, width):
        logger.warning(f"height, width = {height}, {width} are not multiples of {multiple}; using {h}, {w}")
    return h, w


@torch.no_grad()
def sample_images(
    model: Callable[..., torch.Tensor],
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    *,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    orthogonal_strength: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    clamp_denoised: bool = True,
    scheduler: FlowAdapterScheduler | None = None,
    shift: float | DynamicShift | None = None,
    generator: Generator | None = None,
    noise: torch.Tensor | None = None,
    oklab_mean: Sequence[float] = OKLAB_MEAN,
    oklab_std: float = OKLAB_STD,
    decode: bool = True,
    progress_bar: Callable[[Iterable[int]], Iterable[int]] | None = None,
    sigmas: Sequence[float] | None = None,
    step_callback: StepCallback | None = None,
    sampler: Sampler = "fixed",
    adaptive: AdaptiveConfig | None = None,
    return_report: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SamplingReport]:
    """Sample pixel images from text embeddings; no text encoder needed (training-time samples from a cache).

    model(x_t=[B,3,H,W], sigma=[B], encoder_hidden_states=[B,L,D]) -> velocity u [B,3,H,W].
    prompt_embeds [B,L,D]; negative_prompt_embeds [B,L,D] or [1,L,D] (needed whenever guidance is applied).
    Per step i, at σ = scheduler.sigmas[i] (spec §11.2–11.4):
      u_c, u_u = model(x, σ, cond), model(x, σ, neg)      one batched call; u_u skipped when w = 1
      u = u_c + Δ with Δ = (w−1)(u_c − u_u) minus γ·(its part along d = x − σ·u_c)   (orthogonal_guidance)
      u ← (x − Enc(clamp(Dec(x − σu), −1, 1)))/σ          if clamp_denoised
      x ← scheduler.step(u, i, x)
    Starts from fp32 noise [B,3,H,W] (`noise`, else drawn from `generator`; H, W floored to multiples of 16).
    Returns images in [−1,1] [B,3,H,W] fp32 (Oklab-decoded), or the final normalised-Oklab sample if decode=False.
    `scheduler` defaults to FlowAdapterScheduler() (UniPC, static shift 17); `shift` overrides its shift rule;
    `sigmas` (n decreasing values in (0, 1]) replaces the shifted grid and num_inference_steps.
    `step_callback(i, σ_i, x)` runs after each fixed-grid step and returns the sample to continue from.
    sampler="adaptive" integrates the same guided, clamped velocity with `adaptive.sample_adaptive` instead (σ chosen
    by its error control, `adaptive` = AdaptiveConfig; scheduler, shift and num_inference_steps are then unused).
    return_report=True also returns a SamplingReport (NFE used and the σ evaluated).
    """
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [B,L,D], got {tuple(prompt_embeds.shape)}")
    if sampler not in ("fixed", "adaptive"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'fixed' or 'adaptive'")
    height, width = floor_to_multiple(height, width)
    batch, device = prompt_embeds.shape[0], prompt_embeds.device
    if sampler == "fixed":
        scheduler = FlowAdapterScheduler() if scheduler is None else scheduler
        scheduler.set_timesteps(None if sigmas is not None else num_inference_steps, seq_len=height * width,
                                shift=shift, sigmas=sigmas)
        steps = range(len(scheduler.timesteps))
        guided = [guidance_scale_at(float(scheduler.sigmas[i]), guidance_scale, guidance_interval) != 1.0 for i in steps]
    else:  # the σ it visits are not known in advance: guidance may apply wherever the interval allows
        guided = [guidance_scale != 1.0 and (guidance_interval is None or guidance_interval[0] <= guidance_interval[1])]
    both_embeds: torch.Tensor | None = None
    if any(guided):
        if negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_prompt_embeds (e.g. of the empty prompt)")
        if negative_prompt_embeds.shape[0] == 1:
            negative_prompt_embeds = negative_prompt_embeds.expand(batch, -1, -1)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match prompt_embeds "
                f"{tuple(prompt_embeds.shape)} (or have batch 1): cond and uncond run as one batch"
            )
        # uncond first, cond second: chunk(2) below relies on this order.
        both_embeds = torch.cat([negative_prompt_embeds.to(device), prompt_embeds])

    shape = (batch, 3, height, width)
    if noise is None:
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif noise.shape != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    else:
        x = noise.to(device=device, dtype=torch.float32)

    def velocity(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        w = guidance_scale_at(sigma, guidance_scale, guidance_interval)
        return guided_velocity(model, x_t, sigma, prompt_embeds, both_embeds, w, orthogonal_strength,
                               clamp_denoised, tuple(oklab_mean), oklab_std)

    if sampler == "adaptive":
        x, report = sample_adaptive(velocity, x, AdaptiveConfig() if adaptive is None else adaptive)
    else:
        for i in progress_bar(steps) if progress_bar is not None else steps:
            x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), i, x).prev_sample
            if step_callback is not None:
                x = step_callback(i, float(scheduler.sigmas[i]), x)
        grid = [float(s) for s in scheduler.sigmas[:-1]]
        report = SamplingReport("fixed", len(grid), grid, grid + [0.0])
    images = oklab_decode(x, oklab_mean, oklab_std).clamp(-1.0, 1.0) if decode else x
    return (images, report) if return_report else images


@dataclass
class AsymFlowPipelineOutput(ImagePipelineOutput):
    """Images plus what the sampler spent: `nfe` model evaluations (a CFG pass counts once) at `sigmas`."""

    nfe: int | None = None
    sigmas: list[float] | None = None


class AsymFlux2KleinPipeline(DiffusionPipeline, Flux2LoraLoaderMixin):
    """Text-to-image with a pixel-space AsymFLUX.2 klein transformer: Qwen3 prompt embeddings → `sample_images`.

    Components: transformer (AsymFlux2Transformer2DModel), scheduler (FlowAdapterScheduler), text_encoder
    (Qwen3ForCausalLM) and tokenizer (optional: pass prompt_embeds instead). Config: text_hidden_layers,
    max_sequence_length (klein: (9, 18, 27), 512), oklab_mean/oklab_std (the pixel "VAE", spec §10).
    `save_pretrained` / `from_pretrained` round-trip all of it (model_index.json names asymflow's classes), and so
    does diffusers' `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` (a custom-pipeline shim).
    LoRA files in diffusers' layout load with `load_lora_weights` (Flux2LoraLoaderMixin, as on Flux2KleinPipeline).
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: FlowAdapterScheduler,
        text_encoder: torch.nn.Module | None = None,
        tokenizer=None,
        text_hidden_layers: tuple[int, ...] | list[int] = KLEIN_HIDDEN_LAYERS,
        max_sequence_length: int = KLEIN_MAX_LENGTH,
        oklab_mean: tuple[float, float, float] | list[float] = OKLAB_MEAN,
        oklab_std: float = OKLAB_STD,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        # Lists, not tuples: model_index.json stores them as JSON arrays and passes them back as lists.
        self.register_to_config(
            text_hidden_layers=list(text_hidden_layers),
            max_sequence_length=int(max_sequence_length),
            oklab_mean=list(oklab_mean),
            oklab_std=float(oklab_std),
        )
        self.image_processor = VaeImageProcessor(do_normalize=True)  # [−1,1] → [0,1] → pt / np / PIL

    def save_pretrained(self, save_directory: str | PathLike, *args, **kwargs) -> None:
        """diffusers' save, plus the custom-pipeline shim that lets `DiffusionPipeline.from_pretrained` find this
        class (model_index.json `_class_name = ["pipeline_asymflow", "AsymFlux2KleinPipeline"]`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_custom_pipeline_files(save_directory, type(self).__name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PathLike, **kwargs):
        """diffusers' load; a directory whose custom-pipeline file is exactly our shim (it only imports this class)
        needs no `trust_remote_code`, any other file still does."""
        if has_own_shim(pretrained_model_name_or_path, cls.__name__):
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        text_encoder_out_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Prompts → [B·num_images_per_prompt, max_sequence_length, len(layers)·hidden] in the transformer's dtype
        (length and layers default to the pipeline config's)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder / tokenizer: pass prompt_embeds instead of prompts")
        layers = self.config.text_hidden_layers if text_encoder_out_layers is None else text_encoder_out_layers
        embeds = encode_prompts(
            self.text_encoder,
            self.tokenizer,
            prompt,
            hidden_layers=tuple(layers),
            max_length=max_sequence_length or self.config.max_sequence_length,
        )
        device = self._execution_device if device is None else device
        return embeds.repeat_interleave(num_images_per_prompt, dim=0).to(device=device, dtype=self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        orthogonal_strength: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        clamp_denoised: bool = True,
        generator: Generator | None = None,
        shift: float | DynamicShift | None = None,
        num_images_per_prompt: int = 1,
        output_type: OutputType = "pil",
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        progress: bool = True,
        return_dict: bool = True,
        sampler: Sampler = "fixed",
        tol: float | None = None,
        max_nfe: int | None = None,
        image: ReferenceImage | Sequence[ReferenceImage] | None = None,
        sigmas: Sequence[float] | None = None,
        latents: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        text_encoder_out_layers: Sequence[int] | None = None,
    ) -> AsymFlowPipelineOutput | tuple:
        """Generate images; `shift=None` uses the scheduler's rule (static 17 by default, spec §11.5).

        sampler="adaptive": error-controlled steps (`asymflow.adaptive`) with rtol = atol = `tol` on x̂₀ (normalised
        Oklab) and at most `max_nfe` model evaluations (AdaptiveConfig's defaults where None); num_inference_steps,
        shift and the scheduler are then unused. The output's `nfe` and `sigmas` say what was spent, for either sampler.

        output_type: "pil" (list of PIL images), "np" ([B,H,W,3] in [0,1]), "pt" ([B,3,H,W] in [0,1]),
        "latent" (the final normalised-Oklab sample [B,3,H,W]). The negative prompt is encoded only when
        guidance_scale ≠ 1.

        As in diffusers' Flux2KleinPipeline: `image` — one or more reference images (PIL, numpy or [C,H,W] tensors
        in [0,1]) conditioned as spec §5.4 (Oklab-encoded, at most 1024² area, sides floored to 16; height/width
        default to the first one's size, else 1024); `sigmas` — a custom σ grid (n values from ≤ 1 down, no shift
        applied, σ = 0 appended); `latents` — the starting noise [B·num_images_per_prompt,3,H,W] (normalised Oklab);
        `attention_kwargs` — passed to the transformer's attention processors; `callback_on_step_end(pipe, i, t,
        {name: tensor})` after each step with the tensors named in `callback_on_step_end_tensor_inputs` ("latents",
        "prompt_embeds"); "latents" in the dict it returns replace the sample; `max_sequence_length` and
        `text_encoder_out_layers` override the config's text settings.
        """
        device = self._execution_device
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in {self._callback_tensor_inputs}")
        if callback_on_step_end is not None and sampler != "fixed":
            raise ValueError("callback_on_step_end runs after fixed-grid steps: use sampler='fixed'")
        text = {"max_sequence_length": max_sequence_length, "text_encoder_out_layers": text_encoder_out_layers}
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass either prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt, device, num_images_per_prompt, **text)
        else:
            prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is None and guidance_scale != 1.0:
            n_prompts = prompt_embeds.shape[0] // num_images_per_prompt
            negatives = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
            negative_prompt_embeds = self.encode_prompt(negatives, device, num_images_per_prompt, **text)
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        if sampler == "fixed" and (tol is not None or max_nfe is not None):
            raise ValueError("tol and max_nfe apply to sampler='adaptive' only")
        adaptive = AdaptiveConfig.from_tol(tol) if tol is not None else AdaptiveConfig()
        if max_nfe is not None:
            adaptive = replace(adaptive, max_nfe=max_nfe)
        references = None
        if image is not None:
            references = prepare_references(image, self.image_processor, self.config.oklab_mean,
                                            self.config.oklab_std, device)
            height = height or references[0].shape[-2]
            width = width or references[0].shape[-1]
        height, width = height or 1024, width or 1024
        # The pipeline's extra conditioning rides on every model call; sample_images only sees a velocity model.
        model = functools.partial(self.transformer, joint_attention_kwargs=attention_kwargs,
                                  condition_images=references)

        def step_callback(i: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
            values = {"latents": x, "prompt_embeds": prompt_embeds}
            out = callback_on_step_end(self, i, self.scheduler.timesteps[i],
                                       {k: values[k] for k in callback_on_step_end_tensor_inputs}) or {}
            return out.get("latents", x)

        images, report = sample_images(
            model,
            prompt_embeds,
            negative_prompt_embeds,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            orthogonal_strength=orthogonal_strength,
            guidance_interval=guidance_interval,
            clamp_denoised=clamp_denoised,
            scheduler=self.scheduler,
            shift=shift,
            generator=generator,
            noise=latents,
            oklab_mean=tuple(self.config.oklab_mean),
            oklab_std=self.config.oklab_std,
            decode=output_type != "latent",
            progress_bar=self.progress_bar if progress else None,
            sigmas=sigmas,
            step_callback=step_callback if callback_on_step_end is not None else None,
            sampler=sampler,
            adaptive=adaptive,
            return_report=True,
        )
        if output_type != "latent":
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return AsymFlowPipelineOutput(images=images, nfe=report.nfe, sigmas=report.sigmas)
