"""What `asymflow serve` generates with: SOURCE → a pixel pipeline (+ the latent base for --compare-latent), one call
at a time, with a per-step callback and a cooperative cancel. The page (orchestration.serve) knows only this API."""
from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from asymflow.components import BUNDLED_PATH

BUNDLED_NAMES = ("bundled", "tiny_base")  # SOURCE words meaning the repo's assets/tiny_base/
PATCH = 16
MIN_RESOLUTION = 64
REFERENCE_MAX_AREA = 1024 * 1024  # Flux2KleinPipeline's bound on a reference image's area


class GenerationCancelled(Exception):
    """Raised inside the sampling loop when the page's Cancel was pressed; the sampler stops at the next step."""


@dataclass(frozen=True)
class GenerationRequest:
    """One click of Generate, already validated (orchestration.serve_inputs)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    reference: Image.Image | None = None
    sampler: str = "fixed"  # "fixed" (the pipeline's scheduler, `steps` steps) or "adaptive" (error-controlled)


@dataclass
class Generation:
    """The result of one request: the pixel model's image, the latent base's (if compared), what it cost."""

    image: Image.Image
    latent_image: Image.Image | None
    seconds: float
    nfe: int | None = None  # network evaluations, when the sampler reports them (adaptive sampler)
    notes: list[str] = field(default_factory=list)


@dataclass
class LatentBase:
    """The latent model the pixel model was converted from, for the side-by-side: transformer, VAE, B [D,r], s."""

    transformer: Any
    vae: Any
    basis: torch.Tensor
    scale: float


def is_bundled(source: str) -> bool:
    """SOURCE names the bundled tiny base: a keyword or the assets/tiny_base/ directory itself."""
    if source in BUNDLED_NAMES:
        return True
    path = Path(source)
    return path.is_dir() and path.resolve() == BUNDLED_PATH.resolve()


class ServeBackend:
    """A loaded pipeline plus what the page needs to know about it; `generate` is serialised by a lock, so two
    requests never sample at once even if the page's queue were bypassed (two generations would race for memory)."""

    def __init__(self, pipeline: Any, *, source: str, resolution: int, device: torch.device,
                 latent: LatentBase | None = None) -> None:
        self.pipeline, self.source, self.resolution, self.device = pipeline, source, resolution, device
        self.latent = latent
        self._lock = threading.Lock()
        params = inspect.signature(pipeline.__call__).parameters
        # The adaptive sampler (asymflow.adaptive) is offered when the pipeline takes `sampler=`.
        self.samplers: tuple[str, ...] = ("fixed", "adaptive") if "sampler" in params else ("fixed",)
        # Reference images (spec §5.4): through the pipeline's own argument once it has one; until then through the
        # transformer's `condition_images`, which a forward pre-hook adds to every call of this generation.
        self.reference_arg = next((p for p in ("reference_images", "image", "images") if p in params), None)
        self.reference_hook = "condition_images" in inspect.signature(pipeline.transformer.forward).parameters

    @property
    def supports_reference(self) -> bool:
        return self.reference_arg is not None or self.reference_hook

    def generate(self, req: GenerationRequest, on_step: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None, compare_latent: bool = False) -> Generation:
        """Sample one image for `req` (and the latent base's image from the same noise if `compare_latent`)."""
        with self._lock:
            start = time.perf_counter()
            notes: list[str] = []
            pipe = self.pipeline
            kwargs: dict[str, Any] = {}
            condition: list[torch.Tensor] = []
            if req.reference is not None:
                if self.reference_arg is not None:
                    kwargs[self.reference_arg] = [req.reference]
                elif self.reference_hook:
                    condition = [self._reference_pixels(req)]
                else:
                    notes.append("this model has no reference-image conditioning: the reference was not used")
            if req.sampler != "fixed":
                if req.sampler not in self.samplers:
                    raise ValueError(f"sampler {req.sampler!r} is not available; choose one of {self.samplers}")
                kwargs["sampler"] = req.sampler
            # diffusers pipelines iterate their steps through self.progress_bar; an instance attribute shadows the
            # method for this call, which is how the page sees "step i/N". The adaptive sampler has no step count
            # known in advance: it reports model evaluations instead (a forward pre-hook, which also lets Cancel stop
            # any sampler between two evaluations).
            fixed = req.sampler == "fixed"
            pipe.progress_bar = _step_hook(on_step if fixed else None, cancel)
            hook = pipe.transformer.register_forward_pre_hook(
                _evaluation_hook(None if fixed else on_step, cancel, condition), with_kwargs=True)
            try:
                out = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height,
                           width=req.width, num_inference_steps=req.steps, guidance_scale=req.guidance,
                           generator=torch.Generator("cpu").manual_seed(req.seed), output_type="pil", **kwargs)
            finally:
                del pipe.progress_bar
                hook.remove()
            latent_image = None
            if compare_latent and self.latent is not None:
                latent_image = self._latent_image(req, cancel, bool(condition) or self.reference_arg is not None)
            nfe = getattr(out, "nfe", None)
            return Generation(out.images[0], latent_image, time.perf_counter() - start, nfe, notes)

    def _reference_rgb(self, req: GenerationRequest) -> torch.Tensor:
        """The reference as FLUX.2 klein sizes it (asymflow.reference's rule): scaled down to ≤ 1024² pixels of area,
        sides floored to multiples of 16, centre-cropped by the pipeline's image processor: RGB [1,3,h,w] in [−1,1]."""
        w, h = req.reference.size
        if w * h > REFERENCE_MAX_AREA:
            k = (REFERENCE_MAX_AREA / (w * h)) ** 0.5
            w, h = int(w * k), int(h * k)
        w, h = w // PATCH * PATCH, h // PATCH * PATCH
        pixels = self.pipeline.image_processor.preprocess(req.reference, height=h, width=w, resize_mode="crop")
        return pixels.to(self.device, torch.float32)

    def _reference_pixels(self, req: GenerationRequest) -> torch.Tensor:
        """The reference in the pixel model's space (normalised Oklab, the pipeline's statistics): [1,3,h,w]."""
        from asymflow.oklab import oklab_encode

        cfg = self.pipeline.config
        return oklab_encode(self._reference_rgb(req), tuple(cfg.oklab_mean), cfg.oklab_std)

    @torch.no_grad()
    def _latent_image(self, req: GenerationRequest, cancel: threading.Event | None, use_reference: bool) -> Image.Image:
        """The latent base's sample from the same noise ε, decoded by its autoencoder.

        The pixel pipeline draws ε [1,3,H,W] from a CPU generator seeded with req.seed (diffusers randn_tensor); the
        latent model starts from Bᵀε (ε's 16×16 patches projected on the subspace), runs Euler over the calibrated
        times σ̃_i = linspace(1, 0) (its own training schedule; the pixel scheduler's warp(τ; s) maps onto it), with
        classifier-free guidance w from the same negative prompt, and its VAE decodes the result (spec §5.3). A
        reference the pixel model used is given to it too: its VAE latents appended at RoPE time 10 (spec §5.4)."""
        from diffusers.utils.torch_utils import randn_tensor

        from asymflow.latents import decode_latents, encode_latents
        from asymflow.patching import condition_position_ids, image_position_ids, pack, patchify, text_position_ids
        from asymflow.patching import unpack

        lat, pipe = self.latent, self.pipeline
        h, w = req.height // PATCH, req.width // PATCH
        eps = randn_tensor((1, 3, req.height, req.width), generator=torch.Generator("cpu").manual_seed(req.seed),
                           device=self.device, dtype=torch.float32)
        z = patchify(eps, PATCH) @ lat.basis.to(self.device)  # [1, h·w, r]
        dtype = lat.transformer.dtype
        cond = pipe.encode_prompt(req.prompt, self.device)
        text = torch.cat([pipe.encode_prompt(req.negative_prompt, self.device), cond]) if req.guidance != 1 else cond
        img_ids = image_position_ids(h, w, device=self.device)
        txt_ids = text_position_ids(text.shape[1], device=self.device)
        ref = torch.zeros(1, 0, z.shape[-1], device=self.device)
        if use_reference and req.reference is not None:
            grid = encode_latents(lat.vae, self._reference_rgb(req).to(lat.vae.dtype)).float()
            ref = pack(grid)
            img_ids = torch.cat([img_ids, condition_position_ids(*grid.shape[-2:], 0, device=self.device)])
        sigmas = torch.linspace(1.0, 0.0, req.steps + 1, dtype=torch.float64)
        for i in range(req.steps):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()
            zin = torch.cat([z, ref], dim=1)
            zin = torch.cat([zin, zin]) if req.guidance != 1 else zin
            u = lat.transformer(hidden_states=zin.to(dtype), encoder_hidden_states=text.to(dtype),
                                timestep=torch.full((zin.shape[0],), float(sigmas[i]), device=self.device).to(dtype),
                                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0][:, : z.shape[1]].float()
            if req.guidance != 1:
                u_u, u_c = u.chunk(2)
                u = u_u + req.guidance * (u_c - u_u)
            z = z + float(sigmas[i + 1] - sigmas[i]) * u
        rgb = decode_latents(lat.vae, unpack(z, h, w).to(lat.vae.dtype)).float().clamp(-1, 1)
        arr = ((rgb[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(arr)


def _step_hook(on_step: Callable[[int, int], None] | None, cancel: threading.Event | None):
    """A stand-in for DiffusionPipeline.progress_bar: reports (i, N) after each step and stops when cancelled."""

    def progress_bar(iterable=None, total=None):
        items = list(iterable) if iterable is not None else list(range(total or 0))
        for i, item in enumerate(items):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()
            yield item
            if on_step is not None:
                on_step(i + 1, len(items))

    return progress_bar


def _evaluation_hook(on_eval: Callable[[int, int], None] | None, cancel: threading.Event | None,
                     condition: list[torch.Tensor]):
    """A transformer forward pre-hook (with kwargs): stops on Cancel, reports (k, 0) for the k-th model evaluation
    (the total is not known in advance: 0), and adds `condition` as the call's condition_images when given."""
    count = 0

    def hook(module, args, kwargs):
        nonlocal count
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled()
        count += 1
        if on_eval is not None:
            on_eval(count, 0)
        if condition:
            return args, {**kwargs, "condition_images": condition}
        return None

    return hook


def load_backend(source: str, device: str = "cpu", compare_latent: bool = False, base: str | None = None,
                 step: int | None = None) -> ServeBackend:
    """SOURCE → ServeBackend: the bundled base is converted here; everything else goes through `asymflow sample`'s
    resolver (orchestration.sample_source: run dir, export, merged model, saved pipeline, official adapter)."""
    from orchestration.sample_source import load_pipeline, resolve_source

    dev = torch.device(device)
    if is_bundled(source):
        if base is not None or step is not None:
            raise ValueError("--base and --step do not apply to the bundled base")
        return _bundled_backend(source, dev, compare_latent)
    src = resolve_source(source, step, base)
    if src.family is not None:  # the page's sizes (16-px steps), step counter and latent comparison are FLUX.2's
        from asymflow.families import get_family

        raise ValueError(f"{source} is a {get_family(src.family).title} model; asymflow serve runs FLUX.2 models only "
                         f"for now: use `asymflow sample {source} ...` (it samples every family)")
    pipe = load_pipeline(src, device=dev)
    latent = None
    if compare_latent and src.base is not None:
        from asymflow.components import load_base_components

        parts = load_base_components(src.base, ("transformer", "vae"))
        t = pipe.transformer
        latent = LatentBase(parts.transformer.to(dev), parts.vae.to(dev), t.proj_buffer.float(),
                            float(t.scale_buffer))
    return ServeBackend(pipe, source=source, resolution=_training_resolution(src), device=dev, latent=latent)


def _training_resolution(src: Any) -> int:
    """The side of the square the model was trained at: from the source's recorded sample size, else 128 for the
    tiny/bundled bases and 1024 (FLUX.2 klein) otherwise."""
    h, w = src.defaults.get("height"), src.defaults.get("width")
    if h and w:
        return max(MIN_RESOLUTION, int(round((h * w) ** 0.5 / PATCH)) * PATCH)
    kind = getattr(src.base, "kind", None)
    return 128 if kind in ("tiny", "bundled") else 1024


def _bundled_backend(source: str, device: torch.device, compare_latent: bool) -> ServeBackend:
    """The bundled tiny base converted to pixel space with a Procrustes subspace fitted on its own 20 photos
    (as tests/asymflow/test_tiny_base.py does; a second, fit once per start, ~2 s on CPU)."""
    from asymflow.components import BaseModelConfig, load_base_components
    from asymflow.convert import convert_transformer
    from asymflow.latents import encode_latents
    from asymflow.patching import pack
    from asymflow.pipeline import AsymFlux2KleinPipeline
    from asymflow.scheduler import FlowAdapterScheduler
    from asymflow.subspace import ProcrustesFit
    from asymflow.tiny import TINY_MAX_LENGTH, TINY_TEXT_LAYERS
    from data_prep.corpus import BASE_PHOTOS, BASE_RESOLUTION, photo_crop
    from data_prep.subspace_job import pixel_tokens

    parts = load_base_components(BaseModelConfig(kind="bundled"))
    images = torch.stack([torch.from_numpy(photo_crop(n)).permute(2, 0, 1) for n in BASE_PHOTOS]).float() / 127.5 - 1
    fit = ProcrustesFit()
    with torch.no_grad():
        for x in images.split(10):
            for z, image in zip(encode_latents(parts.vae, x), x):
                fit.update(pack(z[None])[0], pixel_tokens(image, "oklab", "channel_first"))
    basis, scale = fit.solve()
    basis = basis.float()
    pixel = convert_transformer(parts.transformer, basis, scale).eval()
    # Static shift s: the pixel grid warp(τ; s) calibrates onto the latent model's uniform training schedule.
    pipe = AsymFlux2KleinPipeline(transformer=pixel, scheduler=FlowAdapterScheduler(shift=float(scale)),
                                  text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                  text_hidden_layers=TINY_TEXT_LAYERS, max_sequence_length=TINY_MAX_LENGTH).to(device)
    latent = None
    if compare_latent:
        latent = LatentBase(parts.transformer.to(device), parts.vae.to(device), basis.to(device), float(scale))
    return ServeBackend(pipe, source=source, resolution=BASE_RESOLUTION, device=device, latent=latent)
