"""SOURCE of a non-FLUX.2 family (FLUX.1, SD3, Qwen-Image, Sana) → a ready-to-sample AsymFlowFamilyPipeline
(`asymflow sample`): a saved family pipeline, an exported family adapter or complete pixel model with `--base <the
family's diffusers pipeline directory>`, or a run directory whose checkpoint builds the family's pixel model.

Every kind ends the same way: a pixel transformer of the family + the family's text components (by their diffusers
pipeline names) from the base directory; only where the transformer comes from differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILY_PIPELINE_CLASS = "AsymFlowFamilyPipeline"


def directory_family(root: Path) -> str | None:
    """The family named by a diffusers directory's model_index.json or config.json (transformer, pixel or pipeline
    class), or None when its classes belong to no family (the FLUX.2 loaders then say what is wrong)."""
    from asymflow.families import detect_family

    try:
        return detect_family(root).name
    except ValueError:
        return None


def is_family_pipeline(root: Path) -> bool:
    """True for a directory saved by AsymFlowFamilyPipeline (its model_index.json names that class)."""
    name = json.loads((root / "model_index.json").read_text()).get("_class_name")
    return (name[-1] if isinstance(name, list) else name) == FAMILY_PIPELINE_CLASS


def check_base(base: str | None, family: str, source: str) -> str:
    """`--base` of a family adapter / model: a local diffusers pipeline directory of the same family (its
    transformer/ is the latent base, its text components encode prompts); ValueError (one line) otherwise."""
    from asymflow.families import get_family

    title = get_family(family).title
    if base is None:
        raise ValueError(f"{source} is a {title} adapter or model without text encoders; pass --base <a {title} "
                         f"diffusers pipeline directory> (its transformer/ and text encoders are used)")
    root = Path(base)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"--base {base}: not a {title} diffusers pipeline directory (no model_index.json)")
    found = directory_family(root)
    if found != family:
        what = f"a model of family {found}" if found else "no model of a known family"
        raise ValueError(f"--base {base} holds {what}, but {source} is a {family} ({title}) model")
    return str(root)


def recorded_base(root: Path) -> str | None:
    """The base directory an export recorded (asymflow_base.json `model.path`), if any."""
    from asymflow.export import BASE_NAME

    path = root / BASE_NAME
    if not path.is_file():
        return None
    try:
        model = json.loads(path.read_text()).get("model") or {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid base record ({exc})") from exc
    return model.get("path") if isinstance(model, dict) else None


def is_complete_family_model(root: Path, family: str) -> bool:
    """True when the directory's weights hold every tensor of the family's pixel model (a save_pretrained or merged
    export), False for an adapter (trained modules + LoRA only)."""
    from asymflow.export import saved_weight_names
    from asymflow.families import get_family

    config = json.loads((root / "config.json").read_text())
    with torch.device("meta"):
        expected = set(get_family(family).pixel_class().from_config(config).state_dict())
    return expected <= saved_weight_names(root)


def family_transformer_facts(kind: str, path: str, base: str | None) -> dict[str, Any]:
    """The pixel transformer's config of a family SOURCE, read from files without loading weights (size checks)."""
    root = Path(path)
    if kind == "pipeline":
        return json.loads((root / "transformer" / "config.json").read_text())
    if kind in ("model", "adapter"):
        return json.loads((root / "config.json").read_text())
    return json.loads((Path(base) / "transformer" / "config.json").read_text())  # run: the latent base's backbone


def load_family_pipeline(kind: str, path: str, family: str, base: str | None, checkpoint: str | None = None,
                         device: str | torch.device = "cpu", weights: str = "ema"):
    """AsymFlowFamilyPipeline for a resolved family SOURCE (see the module docstring), transformer in eval mode.

    pipeline: `AsymFlowFamilyPipeline.from_pretrained`; adapter: `load_family_adapter` onto `base`/transformer;
    model: the family's pixel class `from_pretrained`; run: `build_model_from_checkpoint` (the run's config builds
    the pixel model). Text components come from `base` (load_pipeline_components) for every kind but pipeline.
    """
    from asymflow.families import get_family
    from asymflow.families.adapter import load_family_adapter
    from asymflow.families.pipeline import AsymFlowFamilyPipeline

    if kind == "pipeline":
        pipe = AsymFlowFamilyPipeline.from_pretrained(path)
        if pipe.family.name != family:  # model_index.json named one family, the transformer is another's
            raise ValueError(f"{path}: the transformer is a {pipe.family.name} model, not {family}")
        return pipe.to(device)
    if kind == "adapter":
        transformer = load_family_adapter(path, str(Path(base) / "transformer"))
    elif kind == "model":
        transformer = get_family(family).pixel_class().from_pretrained(path)
    elif kind == "run":
        from orchestration.artifacts import build_model_from_checkpoint

        transformer, _, _ = build_model_from_checkpoint(checkpoint, weights)
        found = getattr(transformer, "family", None)
        if found is None or found().name != family:
            raise ValueError(f"{checkpoint}: the checkpoint does not build a {family} pixel model")
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return AsymFlowFamilyPipeline.with_base_text(transformer.eval(), base).to(device)


__all__ = ["check_base", "directory_family", "family_transformer_facts", "is_complete_family_model",
           "is_family_pipeline", "load_family_pipeline", "recorded_base"]
