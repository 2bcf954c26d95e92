"""`asymflow sample SOURCE --prompt TEXT`: PNGs from a run, an export, a merged model, a pipeline or the official adapter,
with the prompt, seed and settings in each file's metadata. FLUX.2 sources sample with AsymFlux2KleinPipeline; sources
of the other families (FLUX.1, SD3, Qwen-Image, Sana) with AsymFlowFamilyPipeline and the family's sampler defaults."""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.png_metadata import METADATA_KEY, png_info

PIXEL_MULTIPLE = 16  # one transformer token = one 16×16 pixel patch
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_GUIDANCE = 1024, 32, 4.0  # spec §11.5 benchmark settings


def family_defaults_help() -> str:
    """The non-FLUX.2 families' sampler defaults, one clause each, from the registry (their diffusers pipelines')."""
    from asymflow.families import FAMILIES
    from asymflow.families.pipeline import sampler_summary

    return "; ".join(f"{name} ({f.title}): {sampler_summary(f)}" for name, f in FAMILIES.items()
                     if f.sampler is not None)


class _HelpWithFamilies(argparse.Action):
    """-h/--help that first appends the families' sampler defaults: read from the registry only when help is asked
    for, so building the parser for every other command imports no torch or diffusers."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.description += f" Family defaults: {family_defaults_help()}."
        parser.print_help()
        parser.exit()


def add_sample_command(sub: argparse._SubParsersAction) -> None:
    """Register `sample` on the console script's subparsers."""
    from orchestration.sample_source import BASE_HELP

    p = sub.add_parser(
        "sample",
        help="generate PNGs from a run directory, an export, a merged model, a pipeline or the official adapter",
        description="Sample images from SOURCE: a run directory (its latest complete checkpoint, or --step; EMA "
        "weights), an adapter export (asymflow export), a merged model (asymflow export --merged), a pipeline "
        "directory, or the official AsymFLUX.2 adapter (config.json + diffusion_pytorch_model.safetensors; pass "
        "--base). Each PNG carries the prompt, seed and settings in its metadata (text chunks 'prompt', 'seed', "
        f"'{METADATA_KEY}'). Defaults for size, steps and guidance come from the run's sample settings when SOURCE "
        f"records them, else {DEFAULT_SIZE}², {DEFAULT_STEPS} steps, guidance {DEFAULT_GUIDANCE}. "
        "Other families: a saved AsymFlowFamilyPipeline directory, an adapter exported by export_family_adapter (or "
        "a complete pixel model) with --base <the family's diffusers pipeline directory> (latent transformer and text "
        "encoders), or a run directory of that family; sampled with the family's diffusers-pipeline defaults "
        f"({DEFAULT_SIZE}², Euler on its σ grid, its CFG convention).",
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_HelpWithFamilies, help="show this help message and exit")
    p.add_argument("source", metavar="SOURCE", help="run directory, export, merged model, pipeline or adapter directory")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt for guidance [empty]")
    p.add_argument("--image", action="append", default=[], metavar="REF",
                   help="reference image (repeatable; spec §5.4 conditioning, like FLUX.2 klein's image input); "
                        "without --height/--width the first one's size is used")
    p.add_argument("--height", type=int, help="image height, a multiple of 16 (Sana: 32)")
    p.add_argument("--width", type=int, help="image width, a multiple of 16 (Sana: 32)")
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--sampler", choices=("fixed", "adaptive"), default="fixed",
                   help="fixed: --steps UniPC steps on the shifted grid; adaptive: error-controlled steps "
                        "(asymflow.adaptive), as many as --tol needs [fixed]")
    p.add_argument("--tol", type=float, help="adaptive sampler: rtol = atol on x̂₀ in normalised Oklab (one 8-bit "
                                             "L level ≈ 0.025) [0.05]")
    p.add_argument("--max-nfe", type=int, help="adaptive sampler: at most this many model evaluations [64]")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w (1 = off); other families: true "
                                                  "CFG scale [the family's default]")
    p.add_argument("--embedded-guidance", type=float,
                   help="guidance-distilled FLUX.1 (dev): the guidance value the model takes as input [3.5]")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i [0]")
    p.add_argument("--num-images", type=int, default=1, help="images to generate [1]")
    p.add_argument("--out", default="samples", help="output directory [samples]")
    p.add_argument("--step", type=int, help="run directories: checkpoint step [latest complete]")
    p.add_argument("--weights", choices=("ema", "trainable"), default="ema", help="run directories: [ema]")
    p.add_argument("--base", help=f"{BASE_HELP} [the base recorded in SOURCE]")
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.set_defaults(func=_run_sample)


def check_size(name: str, value: int) -> None:
    """A side must be a positive multiple of 16; the message suggests the nearest valid sides."""
    if value <= 0 or value % PIXEL_MULTIPLE:
        lo = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
        raise ValueError(f"--{name} {value} is not a positive multiple of {PIXEL_MULTIPLE} (one token is a "
                         f"16×16 pixel patch); try {lo} or {lo + PIXEL_MULTIPLE}")


def sampling_bytes(config: Mapping[str, Any], height: int, width: int, text_len: int, guided: bool, ref_tokens: int,
                   dtype_bytes: int, patch: int = PIXEL_MULTIPLE) -> int:
    """Rough peak memory of one sampling step beyond the weights.

    Per token of the joint sequence (image + reference + text), a transformer block holds the hidden state, the
    fused projections (qkv + 2 MLP halves: (3 + 2·mlp_ratio)·inner) and the attention output; counted 3× for
    temporaries. The fp32 image, velocity, guidance terms and solver history add ~10 images of 3·H·W fp32.
    Attention itself is taken as memory-efficient (SDPA on CPU and GPU), so no N² term. `patch`: pixels per token
    side (16; Sana 32).
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (height // patch) * (width // patch) + ref_tokens + text_len
    batch = 2 if guided else 1
    per_token = (3 + 2 * config.get("mlp_ratio", 3.0) + 2) * inner * dtype_bytes * 3
    return int(batch * tokens * per_token + 10 * 3 * height * width * 4)


def available_bytes(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(psutil.virtual_memory().available)


def check_fits(need: int, device: str, height: int, width: int) -> None:
    """Checked before loading: a multi-GB model is not loaded for a request it cannot serve."""
    have = available_bytes(device)
    if need > have:
        raise ValueError(f"{width}x{height} needs about {need / 2**30:.1f} GiB to sample on {device} but "
                         f"{have / 2**30:.1f} GiB are free; choose a smaller --height/--width")


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit] or "sample"


def check_sampler(args: argparse.Namespace) -> None:
    """--tol / --max-nfe belong to --sampler adaptive and must be positive (tol) / at least 2 (max-nfe)."""
    if args.sampler == "fixed" and (args.tol is not None or args.max_nfe is not None):
        raise ValueError("--tol and --max-nfe apply to --sampler adaptive only")
    if args.tol is not None and not args.tol > 0:
        raise ValueError(f"--tol {args.tol} must be > 0")
    if args.max_nfe is not None and args.max_nfe < 2:
        raise ValueError(f"--max-nfe {args.max_nfe} must be at least 2")


def sampler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's sampler arguments for the parsed flags (AdaptiveConfig's defaults where a flag is absent)."""
    if args.sampler == "fixed":
        return {}
    return {"sampler": "adaptive", "tol": args.tol, "max_nfe": args.max_nfe}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_sample(args: argparse.Namespace) -> int:
    from orchestration.train_cli import set_process_environment

    set_process_environment()
    try:
        written = sample_to_pngs(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def sample_to_pngs(args: argparse.Namespace) -> list[Path]:
    """Resolve SOURCE, check the request, sample each image from its own seed, write PNGs with metadata."""
    import torch
    from PIL import Image

    from orchestration.sample_source import load_pipeline, resolve_source, transformer_facts

    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check_size(name, getattr(args, name))
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be at least 1")
    check_sampler(args)
    if args.embedded_guidance is not None and not args.embedded_guidance >= 0:
        raise ValueError(f"--embedded-guidance {args.embedded_guidance} must be ≥ 0")
    references = []
    for path in args.image:
        try:
            with Image.open(path) as im:
                references.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--image {path}: cannot read the image ({exc})") from exc

    from asymflow.reference import reference_size

    ref_sizes = [reference_size(im) for im in references]
    ref_tokens = sum(h * w // PIXEL_MULTIPLE**2 for h, w in ref_sizes)
    src = resolve_source(args.source, args.step, args.base)
    if src.family is not None:
        return family_sample_to_pngs(args, src)
    if args.embedded_guidance is not None:
        raise ValueError("--embedded-guidance applies to a guidance-distilled FLUX.1 model; FLUX.2 takes --guidance")
    # Size: the flags, else the first reference's (as Flux2KleinPipeline does), else what SOURCE records, else 1024².
    d = {**src.defaults, **(dict(zip(("height", "width"), ref_sizes[0])) if ref_sizes else {})}
    height = args.height or d.get("height") or DEFAULT_SIZE
    width = args.width or d.get("width") or DEFAULT_SIZE
    steps = args.steps or d.get("steps") or DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else d.get("guidance", DEFAULT_GUIDANCE)
    device = args.device or _default_device()

    config, text_len, weight_bytes = transformer_facts(src)
    need = sampling_bytes(config, height, width, text_len, guidance != 1.0, ref_tokens, weight_bytes)
    check_fits(need, str(device), height, width)

    pipe = load_pipeline(src, device=device, weights=args.weights)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(args.source), "source_kind": src.kind, "checkpoint_step": src.step,
                "height": height, "width": width, "steps": steps, "guidance": guidance,
                "scheduler": dict(pipe.scheduler.config), "reference_images": [str(p) for p in args.image],
                "weights": args.weights if src.kind == "run" else None}
    written = []
    for i in range(args.num_images):
        seed = args.seed + i
        output = pipe(args.prompt, negative_prompt=args.negative_prompt, image=references or None, height=height,
                      width=width, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator(device="cpu").manual_seed(seed), **sampler_kwargs(args))
        # what this image cost: the adaptive sampler's NFE differs per prompt and seed
        spent = {"sampler": args.sampler, "tol": args.tol, "max_nfe": args.max_nfe, "nfe": output.nfe}
        target = out / f"{slug(args.prompt)}-seed{seed}.png"
        output.images[0].save(target, pnginfo=png_info(
            {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, **settings, **spent}, "asymflow"))
        written.append(target)
    return written


def family_sample_to_pngs(args: argparse.Namespace, src: Any) -> list[Path]:
    """`sample_to_pngs` for a non-FLUX.2 family's SOURCE: the family's defaults for steps and guidance (a run's
    recorded size and steps first), one image per seed (noise drawn as `sample_family(seed=...)` draws it), PNG
    metadata with the resolved sampler settings."""
    import torch

    from asymflow.families import get_family
    from orchestration.sample_source import load_pipeline, transformer_facts

    family = get_family(src.family)
    if args.image:
        raise ValueError(f"--image: reference images are FLUX.2 klein conditioning; {family.title} samples from text")
    if args.sampler != "fixed":
        raise ValueError(f"--sampler adaptive is FLUX.2's; {family.title} samples with its own fixed Euler grid")
    patch = family.pixel_patch
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % patch:
            raise ValueError(f"--{name} {value} is not a multiple of {patch} ({family.title}: one token is a "
                             f"{patch}×{patch} pixel patch)")
    defaults = family.sampler
    height = args.height or src.defaults.get("height") or DEFAULT_SIZE
    width = args.width or src.defaults.get("width") or DEFAULT_SIZE
    steps = args.steps or src.defaults.get("steps") or defaults.steps
    guidance = args.guidance if args.guidance is not None else defaults.cfg_scale
    device = args.device or _default_device()
    config, text_len, weight_bytes = transformer_facts(src)
    if args.embedded_guidance is not None and not config.get("guidance_embeds", False):
        raise ValueError(f"--embedded-guidance: {args.source} has no guidance embedding (only a guidance-distilled "
                         f"FLUX.1 takes one); use --guidance for true CFG")
    need = sampling_bytes(config, height, width, text_len, guidance != 1.0, 0, weight_bytes, patch)
    check_fits(need, str(device), height, width)

    pipe = load_pipeline(src, device=device, weights=args.weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(args.source), "source_kind": src.kind, "checkpoint_step": src.step,
                "height": height, "width": width,
                **pipe.sampler_settings(height, width, steps, guidance, args.embedded_guidance),
                "weights": args.weights if src.kind == "run" else None}
    written = []
    for i in range(args.num_images):
        seed = args.seed + i
        output = pipe(args.prompt, negative_prompt=args.negative_prompt, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=guidance, embedded_guidance=args.embedded_guidance,
                      generator=torch.Generator().manual_seed(seed))
        target = out / f"{slug(args.prompt)}-seed{seed}.png"
        output.images[0].save(target, pnginfo=png_info(
            {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, **settings,
             "nfe": output.nfe}, "asymflow"))
        written.append(target)
    return written
