"""Loading a family's pipeline components from a local diffusers directory by its model_index.json, and writing a
tiny one (tests): the parts data prep needs without building the pipeline (no transformer, no scheduler)."""
from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .text import REQUIRED


def text_component_names(family: str) -> tuple[str, ...]:
    """The pipeline component names of the family's tokenizers and text encoders (what encode_family_prompts reads)."""
    from .registry import get_family

    return REQUIRED[get_family(family).name]


def load_pipeline_components(path: str | Path, names: Sequence[str], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """{name: component} for `names` of the diffusers pipeline directory `path`, each loaded with the class its
    model_index.json names (["diffusers" | "transformers", class]) from the subfolder of that name; models in
    `dtype`, in eval mode, frozen. A one-line ValueError names a missing model_index.json, a component it lacks or
    one whose files do not load."""
    root = Path(path).expanduser()
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{root} has no model_index.json (expected a diffusers pipeline directory)")
    index = json.loads(index_file.read_text())
    out: dict[str, Any] = {}
    for name in names:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[1]):
            raise ValueError(f"{index_file} names no component {name!r} (the pipeline needs it)")
        library, class_name = entry
        if library not in ("diffusers", "transformers"):
            raise ValueError(f"{index_file}: component {name!r} comes from {library!r}; expected diffusers or transformers")
        cls = getattr(importlib.import_module(library), class_name, None)
        if cls is None:
            raise ValueError(f"{index_file}: component {name!r} is a {library}.{class_name}, which this {library} lacks")
        try:
            if issubclass(cls, torch.nn.Module):
                # diffusers and transformers name the load dtype differently
                kwargs = {"torch_dtype": dtype} if library == "diffusers" else {"dtype": dtype}
                obj = cls.from_pretrained(str(root), subfolder=name, **kwargs).eval().requires_grad_(False)
            else:
                obj = cls.from_pretrained(str(root), subfolder=name)
        except (OSError, ValueError) as exc:  # missing or unreadable files: one line naming the component
            reason = " ".join(str(exc).split())
            raise ValueError(f"{root / name}: cannot load the {name} component ({class_name}): {reason}") from None
        out[name] = obj
    return out


def save_tiny_family_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """A tiny random pipeline directory of `family` (its diffusers pipeline's save_pretrained: model_index.json,
    transformer/, vae/, the text encoders and tokenizers under the pipeline's names, scheduler/) built from the in-code
    tiny parts: FluxPipeline (flux1), StableDiffusion3Pipeline (sd3: CLIP-L, CLIP-G, T5), QwenImagePipeline
    (qwen_image: Qwen2.5-VL, its video VAE) or SanaPipeline (sana: Gemma-2, the 32× DC-AE)."""
    import diffusers

    from .registry import get_family
    from .tiny import TINY_TRANSFORMER_CONFIGS, build_tiny_family_transformer, build_tiny_family_vae
    from .tiny_text import build_tiny_text_components

    if family not in TINY_TRANSFORMER_CONFIGS:
        raise ValueError(f"no tiny pipeline directory for family {family!r}; have {', '.join(TINY_TRANSFORMER_CONFIGS)}")
    if family == "sana":  # SanaPipeline's scheduler: DPM-Solver++ on flow sigmas (the released config's values)
        scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                          flow_shift=3.0)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipeline = getattr(diffusers, get_family(family).pipeline_classes[0])
    pipe = pipeline(scheduler=scheduler, vae=build_tiny_family_vae(family, seed),
                    transformer=build_tiny_family_transformer(family, seed), **build_tiny_text_components(family, seed))
    pipe.save_pretrained(str(path))
    return Path(path)
