"""Checks and conversions for what the `asymflow serve` page receives: prompt, size, steps, seed, reference image.

Pure functions without Gradio, so the rules are unit-tested directly; each refusal is an InputError whose text is
shown on the page as it is.
"""
from __future__ import annotations

import math
import secrets
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MULTIPLE = 16  # one transformer token = one 16×16 pixel patch
MIN_SIDE = 64
MAX_PROMPT_CHARS = 10_000  # far above what any text encoder here reads (klein: 512 tokens); longer is refused
MAX_STEPS = 100
MAX_SEED = 2**32 - 1
# A reference image is decoded in full before it is resized: refuse more pixels than that (a decompression bomb is
# a small file declaring a huge canvas); PIL's own guard would only warn between 89 and 179 megapixels.
MAX_REFERENCE_PIXELS = 40_000_000
MAX_UPLOAD_BYTES = 20 * 2**20
ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}
CUSTOM = "custom"


class InputError(ValueError):
    """A request the page refuses; the message is written for the person at the page."""


def round_to_multiple(x: float, multiple: int = MULTIPLE) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def size_presets(resolution: int) -> dict[str, tuple[int, int]]:
    """Label → (width, height) for each aspect at about resolution² pixels, sides multiples of 16."""
    out = {}
    for name, (a, b) in ASPECTS.items():
        w = round_to_multiple(resolution * math.sqrt(a / b))
        h = round_to_multiple(resolution * math.sqrt(b / a))
        out[f"{name} · {w}×{h}"] = (w, h)
    return out


def default_max_pixels(resolution: int) -> int:
    """Largest canvas served by default: 4× the training area (2× each side). Beyond it the model is off its
    training distribution and memory grows quadratically in tokens (attention); `--max-pixels` overrides."""
    return 4 * resolution * resolution


def check_prompt(prompt: str | None, name: str = "prompt") -> str:
    """The prompt, stripped. Empty is allowed (an unconditional sample); over MAX_PROMPT_CHARS is refused."""
    prompt = (prompt or "").strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The {name} has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,} "
                         "(the text encoder reads only its first few hundred tokens). Shorten it.")
    return prompt


def check_size(width: float | None, height: float | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) as ints: multiples of 16, each side ≥ MIN_SIDE, width·height ≤ max_pixels."""
    if width is None or height is None:
        raise InputError("Enter a width and a height.")
    if width != int(width) or height != int(height):
        raise InputError(f"Width and height must be whole numbers, got {width} × {height}.")
    w, h = int(width), int(height)
    if w % MULTIPLE or h % MULTIPLE:
        raise InputError(f"Size {w}×{h} is not a multiple of {MULTIPLE} on each side (the model works on "
                         f"{MULTIPLE}×{MULTIPLE} patches); try {round_to_multiple(w)}×{round_to_multiple(h)}.")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(f"Size {w}×{h} is too small: each side must be at least {MIN_SIDE}.")
    if w * h > max_pixels:
        side = int(math.sqrt(max_pixels)) // MULTIPLE * MULTIPLE
        raise InputError(f"Size {w}×{h} ({w * h:,} pixels) is too large for this server: the limit is "
                         f"{max_pixels:,} pixels (e.g. {side}×{side}; `asymflow serve --max-pixels` sets it).")
    return w, h


def resolve_size(choice: str | None, width: float | None, height: float | None, resolution: int,
                 max_pixels: int) -> tuple[int, int]:
    """The size a preset label names, or the custom width/height, checked."""
    presets = size_presets(resolution)
    if choice in presets:
        w, h = presets[choice]
        return check_size(w, h, max_pixels)
    if choice != CUSTOM:
        raise InputError(f"Unknown size {choice!r}.")
    return check_size(width, height, max_pixels)


def check_steps(steps: float | None) -> int:
    if steps is None or steps != int(steps) or not 1 <= int(steps) <= MAX_STEPS:
        raise InputError(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {steps}.")
    return int(steps)


def check_guidance(guidance: float | None) -> float:
    if guidance is None or not math.isfinite(guidance) or not 1.0 <= guidance <= 20.0:
        raise InputError(f"Guidance must be between 1 (none) and 20, got {guidance}.")
    return float(guidance)


def pick_seed(random_seed: bool, seed: float | None) -> int:
    """A fresh random seed, or the given one (0 … 2³²−1)."""
    if random_seed:
        return secrets.randbelow(MAX_SEED + 1)
    if seed is None or seed != int(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed}.")
    return int(seed)


def load_reference(path: str | Path | None, max_pixels: int = MAX_REFERENCE_PIXELS) -> Image.Image | None:
    """An uploaded reference image as RGB, or None; refuses non-images, oversized files and decompression bombs
    before decoding the pixels."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    name = path.name
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise InputError(f"{name} is {path.stat().st_size / 2**20:.1f} MiB; the limit is "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > max_pixels:
                    raise InputError(f"{name} declares {w}×{h} = {w * h:,} pixels, over the {max_pixels:,} "
                                     "accepted for a reference image (a decompression bomb?). Not decoded.")
                if w < MULTIPLE or h < MULTIPLE:
                    raise InputError(f"{name} is {w}×{h}; a reference image needs at least {MULTIPLE}×{MULTIPLE}.")
                im.load()
                return im.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} was refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image this server can read (PNG, JPEG, WebP, …).") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data inside a known format
        raise InputError(f"{name} could not be decoded: {e}") from None
