"""A stored sample's image member: find it among the tar members and decode it to a [3,H,W] tensor in [−1,1]."""
from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import simplejpeg
import torch
from PIL import Image

from .format import IMAGE_FORMATS


def find_image(members: Mapping[str, bytes]) -> tuple[str, bytes]:
    """The (suffix, bytes) of a sample's image member."""
    for suffix in IMAGE_FORMATS:
        if suffix in members:
            return suffix, members[suffix]
    raise KeyError(f"no image member (expected one of {IMAGE_FORMATS}; found {sorted(members)})")


def decode_image(suffix: str, data: bytes) -> torch.Tensor:
    """Encoded image bytes -> FloatTensor [3,H,W] in [−1,1]; JPEG via simplejpeg (libjpeg-turbo), the rest via PIL."""
    if suffix == "jpg":
        array = simplejpeg.decode_jpeg(data, colorspace="RGB")
    else:
        with Image.open(io.BytesIO(data)) as img:
            array = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # writable copy for torch
    # uint8 HWC -> float CHW in [−1,1]: x/127.5 − 1.
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
