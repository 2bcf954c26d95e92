"""SOURCE → a ready-to-sample AsymFlux2KleinPipeline, for a run directory, an export, a merged model, a saved pipeline
or the official adapter (`asymflow sample`, `asymflow serve`); sources of the other families (FLUX.1, SD3, Qwen-Image,
Sana) are recognised here (`Source.family`) and loaded by orchestration.family_source."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

SourceKind = Literal["run", "pipeline", "model", "adapter"]
BASE_HELP = ("the latent base an adapter attaches to: 'tiny', 'bundled', or a directory (a FLUX.2 klein diffusers "
             "directory with transformer/ text_encoder/ tokenizer/, or one with only transformer/, whose text encoder "
             "is then the in-code tiny Qwen3)")


@dataclass(frozen=True)
class Source:
    """What SOURCE is. kind: run (checkpoints/), pipeline (model_index.json), model (a complete transformer directory:
    a merged export), adapter (an export or the official adapter: trained tensors + LoRA on a latent base)."""

    kind: SourceKind
    path: str
    step: int | None = None  # run: the checkpoint step used
    checkpoint: str | None = None  # run: the checkpoint directory used
    base: Any = None  # BaseModelConfig of the latent base / text encoder (None for a pipeline directory)
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults recorded with the source
    # A non-FLUX.2 family's name (then `base` is the family's diffusers pipeline directory, or the run's model config);
    # None for FLUX.2, whose sources keep every behaviour above.
    family: str | None = None

    @property
    def base_dir(self) -> str | None:
        """The family base directory (text components, latent transformer/) of a family source."""
        return getattr(self.base, "path", self.base)


def base_from_arg(base: str) -> Any:
    """`--base` → BaseModelConfig: 'tiny' / 'bundled' or a directory (diffusers layout: the klein text settings)."""
    from asymflow.components import BaseModelConfig
    from asymflow.text import KLEIN_HIDDEN_LAYERS, KLEIN_MAX_LENGTH

    if base in ("tiny", "bundled"):
        return BaseModelConfig(kind=base)
    root = Path(base)
    if (root / "transformer").is_dir():
        _refuse_other_family(root, f"--base {base}")
    if (root / "text_encoder").is_dir():
        return BaseModelConfig(kind="diffusers", path=str(root), text_hidden_layers=KLEIN_HIDDEN_LAYERS,
                               max_sequence_length=KLEIN_MAX_LENGTH)
    if (root / "transformer").is_dir():
        return BaseModelConfig(kind="bundled", path=str(root))
    raise ValueError(f"--base {base}: not 'tiny', 'bundled', or a directory with transformer/ (and text_encoder/)")


def _refuse_other_family(root: Path, what: str) -> None:
    """ValueError if the diffusers directory `root` (model_index.json, else transformer/config.json), given as the
    base of a FLUX.2 source, holds a model of another family; classes no family knows are left to the loaders."""
    from asymflow.components import TRAINING_FAMILY, BaseModelConfig
    from asymflow.families import get_family

    try:
        family = BaseModelConfig(kind="diffusers", path=str(root)).detected_family()
    except ValueError:
        return
    if family not in (None, TRAINING_FAMILY):
        raise ValueError(f"{what} holds a model of family {family} ({get_family(family).title}), but SOURCE is a "
                         f"FLUX.2 model: its base must be a FLUX.2 klein directory, 'tiny' or 'bundled'")


def _run_family(model: Any) -> str | None:
    """A run's non-FLUX.2 family (its model config's `family`, else the family of model.path), or None."""
    from asymflow.components import TRAINING_FAMILY

    try:
        family = model.family or model.detected_family()
    except ValueError:
        return None
    return None if family in (None, TRAINING_FAMILY) else family


def _family_source(root: Path, source: str, family: str, base: str | None) -> Source:
    """A family's saved pipeline, or its adapter / complete pixel model with a base directory of the family."""
    from asymflow.families import get_family
    from orchestration import family_source as fs

    if (root / "model_index.json").is_file():
        if fs.is_family_pipeline(root):
            return Source("pipeline", source, family=family)
        title = get_family(family).title
        raise ValueError(f"{source} is a latent {title} diffusers pipeline, not an AsymFlow one: sample an adapter "
                         f"converted from it with `asymflow sample ADAPTER --base {source}`")
    if json.loads((root / "config.json").read_text()).get("_class_name") == get_family(family).transformer_class:
        raise ValueError(f"{source} is a latent {get_family(family).title} transformer, not an AsymFlow pixel model: "
                         f"convert it (asymflow.families.convert_family_transformer) or sample an adapter")
    chosen = fs.check_base(base if base is not None else fs.recorded_base(root), family, source)
    kind: SourceKind = "model" if fs.is_complete_family_model(root, family) else "adapter"
    return Source(kind, source, base=chosen, family=family)


def _recorded_base(root: Path) -> tuple[Any, dict[str, Any]]:
    """(BaseModelConfig, sampling defaults) recorded in an export's asymflow_base.json, or (None, {})."""
    from asymflow.components import BaseModelConfig
    from asymflow.export import BASE_NAME

    path = root / BASE_NAME
    if not path.is_file():
        return None, {}
    try:
        info = json.loads(path.read_text())
        return BaseModelConfig.model_validate(info["model"]), dict(info.get("sample", {}))
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid base record ({str(exc).splitlines()[0]})") from exc


def _is_complete_model(root: Path, config: dict[str, Any]) -> bool:
    """True when the directory's weights hold every tensor of the model (merged export, full fine-tune export)."""
    from asymflow.export import saved_weight_names
    from asymflow.model import AsymFlux2Transformer2DModel

    with torch.device("meta"):
        expected = set(AsymFlux2Transformer2DModel.from_config(config).state_dict())
    return expected <= saved_weight_names(root)


def resolve_source(source: str, step: int | None = None, base: str | None = None) -> Source:
    """Classify SOURCE (see `Source`) and find its base: the run's config, `--base`, or the export's record."""
    from orchestration import checkpoint as ckpt
    from orchestration.artifacts import resolve_checkpoint
    from orchestration.config import RunConfig

    root = Path(source)
    if (root / ckpt.CHECKPOINTS).is_dir() or "://" in source:
        path = resolve_checkpoint(source, step)
        state = ckpt.read_state(path)
        cfg = RunConfig.model_validate(state["config"])
        s = cfg.sample
        family = _run_family(cfg.model)
        if family is not None:  # guidance: the family's own convention, not the FLUX.2 sample setting
            return Source("run", source, int(state["step"]), path, cfg.model,
                          {"height": s.height, "width": s.width, "steps": s.steps}, family=family)
        return Source("run", source, int(state["step"]), path, cfg.model,
                      {"height": s.height, "width": s.width, "steps": s.steps, "guidance": s.guidance})
    if step is not None:
        raise ValueError(f"--step applies to run directories only; {source} has no checkpoints/")
    from orchestration.family_source import directory_family

    if (root / "model_index.json").is_file():
        family = directory_family(root)
        if family not in (None, "flux2"):
            return _family_source(root, source, family, base)
        return Source("pipeline", source, defaults=_recorded_base(root)[1])
    if not root.is_dir():
        raise ValueError(f"{source} does not exist or is not a directory")
    if not (root / "config.json").is_file():
        raise ValueError(f"{source} is not a run directory (checkpoints/), a pipeline (model_index.json), or a model "
                         f"or adapter directory (config.json)")
    family = directory_family(root)
    if family not in (None, "flux2"):
        return _family_source(root, source, family, base)
    from asymflow.export import read_pixel_config

    config = read_pixel_config(root)
    recorded, defaults = _recorded_base(root)
    chosen = base_from_arg(base) if base is not None else recorded
    kind: SourceKind = "model" if _is_complete_model(root, config) else "adapter"
    if chosen is None:
        what = "an adapter: its LoRA attaches to a latent base" if kind == "adapter" else "a model without a text encoder"
        raise ValueError(f"{source} is {what}; pass --base ({BASE_HELP})")
    return Source(kind, source, base=chosen, defaults=defaults)


def transformer_facts(src: Source) -> tuple[dict[str, Any], int, int]:
    """(backbone config, text length, bytes per weight) of SOURCE's transformer, read from config files without
    loading any weights, so a request too large to sample is refused before a large model is loaded."""
    from diffusers import Flux2Transformer2DModel

    from asymflow.components import BUNDLED_PATH, DTYPES
    from asymflow.tiny import TINY_TRANSFORMER_CONFIG

    root = Path(src.path)
    if src.family is not None:  # text length: FLUX.1's T5 window, about the others' (SD3 333, Sana 300)
        from orchestration.family_source import family_transformer_facts

        return family_transformer_facts(src.kind, src.path, src.base_dir), 512, 4
    if src.kind == "pipeline":
        index = json.loads((root / "model_index.json").read_text())
        config = json.loads((root / "transformer" / "config.json").read_text())
        return config, int(index.get("max_sequence_length", 512)), 4
    base = src.base
    bytes_per = torch.finfo(DTYPES[base.dtype]).bits // 8
    if src.kind in ("model", "adapter"):
        config = json.loads((root / "config.json").read_text())
    elif base.kind == "tiny":
        config = dict(TINY_TRANSFORMER_CONFIG)
    else:
        config = dict(Flux2Transformer2DModel.load_config(base.path or str(BUNDLED_PATH), subfolder="transformer"))
    return config, base.max_sequence_length, bytes_per


def load_pipeline(
    source: str | Source,
    step: int | None = None,
    base: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights: Literal["ema", "trainable"] = "ema",
):
    """SOURCE → AsymFlux2KleinPipeline on `device`, transformer in eval mode (a family source: AsymFlowFamilyPipeline,
    see orchestration.family_source; `dtype` does not apply to it).

    run directory: the checkpoint at `step` (latest complete by default), EMA weights (or `weights="trainable"`),
        base and text encoder from the run's config;
    pipeline directory: `AsymFlux2KleinPipeline.from_pretrained`;
    merged model / full export: `AsymFlux2Transformer2DModel.from_pretrained`, text encoder from `base`;
    adapter (ours or the official layout): `load_adapter` onto `base`'s latent transformer.
    `base` ('tiny', 'bundled' or a directory) overrides the base recorded in an export (asymflow_base.json).
    `dtype` casts the transformer (B and s stay fp32); default: the base config's dtype (fp32 for a directory).
    Raises ValueError / FileNotFoundError with a one-line message on bad input.
    """
    from asymflow.components import BUNDLED_PATH, DTYPES, load_base_components
    from asymflow.export import load_adapter
    from asymflow.model import AsymFlux2Transformer2DModel
    from asymflow.pipeline import AsymFlux2KleinPipeline
    from asymflow.scheduler import released_pipeline_scheduler
    from orchestration.artifacts import build_model_from_checkpoint

    src = source if isinstance(source, Source) else resolve_source(source, step, base)
    if src.family is not None:
        from orchestration.family_source import load_family_pipeline

        return load_family_pipeline(src.kind, src.path, src.family, src.base_dir, src.checkpoint, device, weights)
    if src.kind == "pipeline":
        pipe = AsymFlux2KleinPipeline.from_pretrained(src.path, torch_dtype=dtype)
    else:
        if src.kind == "run":
            transformer, _, _ = build_model_from_checkpoint(src.checkpoint, weights)
        elif src.kind == "model":
            transformer = AsymFlux2Transformer2DModel.from_pretrained(src.path, torch_dtype=dtype)
        else:
            local = Path(src.base.path or BUNDLED_PATH) / "transformer" if src.base.kind != "tiny" else None
            if local is not None and local.is_dir():
                # A path, not a loaded model: load_adapter then owns the base and converts it without a second copy.
                transformer = load_adapter(src.path, local, dtype=DTYPES[src.base.dtype])
            else:  # in-code tiny model, or a hub id
                transformer = load_adapter(src.path, load_base_components(src.base, ("transformer",)).transformer)
        target = dtype or DTYPES[src.base.dtype]
        if transformer.dtype != target:
            transformer = transformer.to(target)
        parts = load_base_components(src.base, ("text_encoder", "tokenizer"))
        pipe = AsymFlux2KleinPipeline(
            transformer.eval(), released_pipeline_scheduler(), parts.text_encoder, parts.tokenizer,
            text_hidden_layers=src.base.text_hidden_layers, max_sequence_length=src.base.max_sequence_length,
        )
    return pipe.to(device)
