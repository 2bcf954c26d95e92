"""The registered families by name, and the one-line list of them that error messages give."""
from __future__ import annotations

from .core import ModelFamily
from .flux1 import FLUX1
from .flux2 import FLUX2
from .qwen_image import QWEN_IMAGE
from .sana import SANA
from .sd3 import SD3

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (FLUX2, FLUX1, SD3, QWEN_IMAGE, SANA)}


def supported_families() -> str:
    """'flux2 (Flux2Transformer2DModel), flux1 (...), ...' for error messages."""
    return ", ".join(f"{name} ({family.transformer_class})" for name, family in FAMILIES.items())


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported families: {supported_families()}")
    return FAMILIES[name]
