"""Model-family registry: the latent diffusers transformers asymflow converts to pixel models (issue 15).

Importing this package is cheap: family entries are plain data; pixel classes (`ModelFamily.pixel_class()`, in the
`*_model` modules) and the conversion (`conversion.convert_family_transformer`) are imported when asked for.
"""
from __future__ import annotations

from .core import ModelFamily, PatchIO, SamplerDefaults
from .detect import detect_family
from .registry import FAMILIES, get_family, supported_families

__all__ = ["FAMILIES", "ModelFamily", "PatchIO", "SamplerDefaults", "detect_family", "get_family", "supported_families"]
