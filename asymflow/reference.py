"""Reference images for the pipeline (spec §5.4): sized and cropped like FLUX.2 klein's, then Oklab-encoded into the
pixel model's input space."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .oklab import OKLAB_MEAN, OKLAB_STD, oklab_encode

PIXEL_MULTIPLE = 16  # one transformer token = one 16×16 pixel patch
MAX_AREA = 1024 * 1024  # Flux2KleinPipeline resizes larger references down to this area
ReferenceImage = PIL.Image.Image | np.ndarray | torch.Tensor


def _hw(image: ReferenceImage) -> tuple[int, int]:
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if isinstance(image, np.ndarray):  # [H,W,C] or [B,H,W,C], like diffusers
        return shape[-3], shape[-2]
    return shape[-2], shape[-1]  # tensors [C,H,W] or [B,C,H,W]


def reference_size(image: ReferenceImage) -> tuple[int, int]:
    """(H, W) a reference is conditioned at: scaled down to at most 1024² pixels of area (aspect kept), then floored
    to multiples of 16 — Flux2KleinPipeline's rule with its VAE multiple replaced by the pixel patch."""
    height, width = _hw(image)
    if height * width > MAX_AREA:
        factor = (MAX_AREA / (height * width)) ** 0.5
        height, width = int(height * factor), int(width * factor)
    h, w = height // PIXEL_MULTIPLE * PIXEL_MULTIPLE, width // PIXEL_MULTIPLE * PIXEL_MULTIPLE
    if h == 0 or w == 0:
        raise ValueError(f"reference image of {height}x{width} is smaller than one {PIXEL_MULTIPLE}x{PIXEL_MULTIPLE} patch")
    return h, w


def prepare_references(
    images: ReferenceImage | Sequence[ReferenceImage],
    processor: VaeImageProcessor,
    mean: Sequence[float] = OKLAB_MEAN,
    std: float = OKLAB_STD,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Reference images (PIL, numpy [H,W,C] in [0,1], or tensors [C,H,W] in [0,1]; one or a list) →
    condition images [1,3,h,w] in normalised Oklab, fp32: resized/cropped to `reference_size` by diffusers'
    image processor (resize_mode="crop"), mapped to [−1,1], then `oklab_encode`d."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for image in images:
        h, w = reference_size(image)
        pixels = processor.preprocess(image, height=h, width=w, resize_mode="crop").to(device, torch.float32)
        if pixels.shape[0] != 1:
            raise ValueError(f"a reference image must be one image, got a batch of {pixels.shape[0]}")
        out.append(oklab_encode(pixels, tuple(mean), std))
    return out
