"""asymflow: the AsymFlow method — turn latent flow-matching transformers into pixel-space models.

The names below are the public, stable API (documented in README). They are imported lazily so that
`import asymflow` stays cheap and never pulls in more than the function asked for.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "patchify": "asymflow.patching",
    "unpatchify": "asymflow.patching",
    "pack": "asymflow.patching",
    "unpack": "asymflow.patching",
    "calibrate": "asymflow.parameterisation",
    "recover_velocity": "asymflow.parameterisation",
    "recover_x0": "asymflow.parameterisation",
    "ProcrustesFit": "asymflow.subspace",
    "PCAFit": "asymflow.subspace",
    "SubspaceArtifact": "asymflow.subspace",
    "oklab_encode": "asymflow.oklab",
    "oklab_decode": "asymflow.oklab",
    "orthogonal_guidance": "asymflow.guidance",
    "convert_transformer": "asymflow.convert",
    "AsymFlux2Transformer2DModel": "asymflow.model",
    "vr_coefficient": "asymflow.objective",
    "export_adapter": "asymflow.export",
    "load_adapter": "asymflow.export",
    "load_pixel_base": "asymflow.export",
    "export_merged": "asymflow.export",
    "AsymFlux2KleinPipeline": "asymflow.pipeline",
    "sample_images": "asymflow.pipeline",
    "FlowAdapterScheduler": "asymflow.scheduler",
    "released_pipeline_scheduler": "asymflow.scheduler",
    "AdaptiveConfig": "asymflow.adaptive",
    "SamplingReport": "asymflow.adaptive",
    "sample_adaptive": "asymflow.adaptive",
    "get_family": "asymflow.families",
    "detect_family": "asymflow.families",
    "fit_family_subspace": "asymflow.families.fit",
    "convert_family_transformer": "asymflow.families.conversion",
    "export_family_adapter": "asymflow.families.adapter",
    "load_family_adapter": "asymflow.families.adapter",
    "encode_family_prompts": "asymflow.families.text",
    "sampling_inputs": "asymflow.families.text",
    "sample_family": "asymflow.families.sampling",
    "AsymFlowFamilyPipeline": "asymflow.families.pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asymflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
