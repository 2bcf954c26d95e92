"""Model-family registry: the latent diffusers transformers asymflow converts to pixel models (issue 15).

Importing this package is cheap: family entries are plain data; pixel classes (`ModelFamily.pixel_class()`, in the
`*_model` modules) and the conversion (`conversion.convert_family_transformer`) are imported when asked for.
"""
from __future__ import annotations

from .core import ModelFamily, PatchIO, SamplerDefaults
from .detect import detect_family
from .registry import FAMILIES, get_family, supported_families
from .text import encode_family_prompts, sampling_inputs

__all__ = [
    "FAMILIES", "ModelFamily", "PatchIO", "SamplerDefaults", "detect_family", "encode_family_prompts", "get_family",
    "sampling_inputs", "supported_families",
]
