"""Adapter export of a pixel AsymFlow transformer (spec §12) in the official layout plus peft's and diffusers' LoRA
formats, and the loaders: onto a latent base (ours, official layout included) or merged into a full model."""
from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from asymflow.adapter_formats import (
    diffusers_lora_file,
    is_lora_key,
    lora_config_from_tensors,
    peft_config,
    peft_state_dict,
)
from asymflow.convert import LatentModel, convert_transformer, load_latent_transformer
from asymflow.model import FP32_BUFFERS, AsymFlux2Transformer2DModel

CONFIG_NAME = "config.json"  # the pixel model's diffusers config
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # official layout: trained tensors + buffers + LoRA
LORA_CONFIG_NAME = "adapter_config.json"  # peft LoraConfig (base_model_name_or_path, modules_to_save)
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # PeftModel.from_pretrained
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers load_lora_adapter / load_lora_weights
BASE_NAME = "asymflow_base.json"  # the latent base (and sampling defaults) the adapter was trained with
CARD_NAME = "README.md"  # model card

# Fully trained tensors (spec §9) plus the buffers; everything else comes from the latent base.
FULL_TENSORS = ("x_embedder.weight", "proj_out.weight", "norm_out.linear.weight")
FULL_MODULES = ("x_embedder", "proj_out", "norm_out")  # the modules holding FULL_TENSORS (peft modules_to_save)
EXPORT_TENSORS = FULL_TENSORS + FP32_BUFFERS


def _strip_base_layer(name: str) -> str:
    """peft wraps a targeted Linear as `<module>.base_layer`; exported names are those of the bare model."""
    return name.replace(".base_layer.", ".")


def adapter_state_dict(
    pixel_model: AsymFlux2Transformer2DModel,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    full_tensors: Sequence[str] = FULL_TENSORS,
) -> dict[str, torch.Tensor]:
    """The exported tensors (spec §12: trainable tensors + buffers): `full_tensors` (FLUX.2's by default) and the
    buffers (`EXPORT_TENSORS` for FLUX.2), every other parameter the
    model trains in full (all of them under `trainable.mode: full`), and `<module>.lora_A.weight` /
    `.lora_B.weight` of one adapter.

    `state_dict` (e.g. EMA weights, keys as in `pixel_model.state_dict()`, adapter names included) replaces the
    live weights; it must hold every trained tensor, while missing buffers are taken from the model (spec §9: the
    EMA covers trainable parameters, buffers are copied). Only the config and which parameters require grad are
    read from the model in that case, so it also works for a ZeRO-3 model whose parameters are partitioned.
    """
    source = dict(pixel_model.state_dict() if state_dict is None else state_dict)
    plain = {_strip_base_layer(name): t for name, t in source.items() if not is_lora_key(name)}
    # A fully trained tensor left out would silently revert to the latent base's re-projected weights on load.
    trained = sorted({_strip_base_layer(name) for name, p in pixel_model.named_parameters()
                      if p.requires_grad and not is_lora_key(name)} - {*full_tensors, *FP32_BUFFERS})
    tensors: dict[str, torch.Tensor] = {}
    for name in (*full_tensors, *FP32_BUFFERS, *trained):
        if name in plain:
            tensors[name] = plain[name]
        elif name in FP32_BUFFERS:
            tensors[name] = pixel_model.get_buffer(name)
        else:
            raise ValueError(f"state_dict has no tensor {name} (also looked for the peft name with .base_layer)")
    if adapter_name in (getattr(pixel_model, "peft_config", None) or {}):
        lora = get_peft_model_state_dict(pixel_model, state_dict=source, adapter_name=adapter_name)
        if not lora:
            raise ValueError(f"LoRA adapter {adapter_name!r} is attached but the state_dict holds none of its tensors")
        tensors.update(lora)
    # safetensors refuses views and shared storage; the export is a standalone copy on CPU.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _umask_modes(root: Path) -> None:
    """Give every written file the mode the user's umask implies: safetensors writes its files 0600 (a temporary
    file renamed into place), which left the weights unreadable to the group next to 0644 siblings."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def write_staged(out_dir: str | PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` into a fresh sibling directory, then rename it to `out_dir` (replacing an old one).

    Nothing half-written ever carries the final name: an error or a kill leaves only `.staging-*`, removed on error.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".staging-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        _umask_modes(staging)
        if out.exists():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_adapter(
    pixel_model: AsymFlux2Transformer2DModel,
    out_dir: str | PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    base_model: str | None = None,
    base_info: Mapping[str, Any] | None = None,
    card: str | None = None,
    full_modules: Sequence[str] = FULL_MODULES,
    full_tensors: Sequence[str] = FULL_TENSORS,
) -> Path:
    """Write the adapter directory, staged and renamed last (see `write_staged`):

    - `config.json` + `diffusion_pytorch_model.safetensors`: the official layout (spec §12), read by `load_adapter`;
    - with a LoRA, `adapter_config.json` + `adapter_model.safetensors` (peft: `PeftModel.from_pretrained`, the fully
      trained modules as `modules_to_save`) and `pytorch_lora_weights.safetensors` (diffusers: `load_lora_adapter`,
      `load_lora_weights`); both hold the same LoRA tensors as the official file;
    - `asymflow_base.json` (`base_info`: which latent base and text encoder to rebuild) and `README.md` (`card`).

    `base_model` names the latent base (hub id or path) for peft's `base_model_name_or_path`. The adapter name is
    stripped from LoRA keys; loaders re-attach them under a name of their choosing. `full_modules` / `full_tensors`:
    the fully trained modules and their tensors (FLUX.2's by default; `asymflow.families.adapter` passes a family's).
    """
    tensors = adapter_state_dict(pixel_model, state_dict, adapter_name, full_tensors)
    lora = {name: t for name, t in tensors.items() if is_lora_key(name)}

    def write(staging: Path) -> None:
        pixel_model.save_config(staging)
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        if lora:
            config = peft_config(pixel_model.peft_config[adapter_name], full_modules, base_model)
            config.save_pretrained(staging)
            full = {name: tensors[name] for name in full_tensors}
            save_file(peft_state_dict(lora, full), staging / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
            diffusers_tensors, metadata = diffusers_lora_file(lora, pixel_model.peft_config[adapter_name])
            save_file(diffusers_tensors, staging / DIFFUSERS_LORA_NAME, metadata=metadata)
        if base_info is not None:
            (staging / BASE_NAME).write_text(json.dumps(dict(base_info), indent=2) + "\n")
        if card is not None:
            (staging / CARD_NAME).write_text(card)

    return write_staged(out_dir, write)


def _json_normalised(value: Any) -> Any:
    """Config values as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a ValueError naming it when it is missing or unreadable (truncated, corrupted)."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def saved_weight_names(root: Path) -> set[str]:
    """The tensor names a model directory's weights hold (a single or sharded save_pretrained file); one ValueError
    line for a directory without weights or with a damaged file. Read from the header only: no tensor is loaded."""
    from safetensors import safe_open

    index = root / f"{WEIGHTS_NAME}.index.json"  # a sharded save_pretrained
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    if not (root / WEIGHTS_NAME).is_file():
        raise ValueError(f"{root} has config.json but no {WEIGHTS_NAME}")
    try:
        with safe_open(root / WEIGHTS_NAME, "pt") as f:
            return set(f.keys())
    except Exception as exc:  # SafetensorError for a truncated or damaged file
        raise ValueError(f"{root / WEIGHTS_NAME} is not a readable safetensors file ({exc})") from exc


def read_pixel_config(adapter_dir: Path) -> dict[str, Any]:
    """The pixel transformer config of an export, checked to describe AsymFlux2Transformer2DModel."""
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not an adapter or model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    class_name = config.get("_class_name")
    if class_name != AsymFlux2Transformer2DModel.__name__:
        raise ValueError(f"{path} describes {class_name!r}, not {AsymFlux2Transformer2DModel.__name__}")
    return config


def adapter_lora_config(adapter_dir: Path, lora: Mapping[str, torch.Tensor]) -> LoraConfig:
    """Our export's saved LoraConfig (without `modules_to_save`: the full tensors are loaded as plain weights), or,
    for the official layout without adapter_config.json, the config implied by the tensors."""
    if not (adapter_dir / LORA_CONFIG_NAME).is_file():
        return lora_config_from_tensors(lora)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.modules_to_save = None
    config.inference_mode = False
    return config


def load_pixel_base(
    adapter_dir: str | PathLike,
    base_latent_model: LatentModel,
    dtype: torch.dtype | None = None,
    trained_modules: bool = True,
) -> AsymFlux2Transformer2DModel:
    """The pixel model an adapter's LoRA attaches to: the latent base converted with the exported B and s, with the
    exported fully trained tensors (`trained_modules=True`) or the converted init's (for peft, whose
    `modules_to_save` bring them). Checks that the base's config fits the adapter's."""
    return _load_plain(Path(adapter_dir), base_latent_model, dtype, trained_modules)[0].eval()


def _load_plain(
    adapter_dir: Path, base_latent_model: LatentModel, dtype: torch.dtype | None, trained_modules: bool
) -> tuple[AsymFlux2Transformer2DModel, dict[str, torch.Tensor]]:
    config = read_pixel_config(adapter_dir)
    tensors = read_tensors(adapter_dir / WEIGHTS_NAME)
    lora = {name: t for name, t in tensors.items() if is_lora_key(name)}
    plain = {name: t for name, t in tensors.items() if not is_lora_key(name)}
    if missing := [name for name in EXPORT_TENSORS if name not in plain]:
        raise ValueError(f"{adapter_dir / WEIGHTS_NAME} lacks tensors {missing}")

    latent, owned = load_latent_transformer(base_latent_model, torch_dtype=dtype)
    expected = AsymFlux2Transformer2DModel.from_latent_config(
        latent.config,
        base_rank=config.get("base_rank"),
        sigma_min=config.get("sigma_min", 1e-4),
        patch_size=config.get("patch_size", 16),
        in_channels=config.get("in_channels", 3),
    )
    # A key the adapter's config leaves out takes the class default, as diffusers' from_config does.
    defaults = {k: p.default for k, p in inspect.signature(AsymFlux2Transformer2DModel.__init__).parameters.items()}
    mismatched = {
        key: (config.get(key, defaults.get(key)), value)
        for key, value in expected.items()
        if _json_normalised(config.get(key, defaults.get(key))) != _json_normalised(value)
    }
    if mismatched:
        details = ", ".join(f"{key}: adapter {a!r} vs base {b!r}" for key, (a, b) in mismatched.items())
        raise ValueError(f"adapter {adapter_dir} does not fit this latent base: {details}")

    model = convert_transformer(
        latent, plain["proj_buffer"], plain["scale_buffer"], sigma_min=expected["sigma_min"], share_weights=owned
    )
    if not trained_modules:
        plain = {name: t for name, t in plain.items() if name in FP32_BUFFERS}
    result = model.load_state_dict(plain, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors {result.unexpected_keys} do not exist in the pixel model")
    if dtype is not None:
        model.to(dtype)
    return model, lora


def load_adapter(
    adapter_dir: str | PathLike,
    base_latent_model: LatentModel,
    adapter_name: str = "default",
    merge: bool = False,
    dtype: torch.dtype | None = None,
) -> AsymFlux2Transformer2DModel:
    """Pixel model = latent base (all non-surgery tensors) ← exported tensors, + the LoRA as an unfused peft adapter.

    Reads our exports and the official layout (no adapter_config.json: rank from the lora_A shapes, alpha = rank,
    targets = the modules with LoRA tensors). The base is converted with the exported B and s
    (`convert_transformer`, which checks B and every shape), then the exported tensors overwrite the re-projected
    ones. The LoRA is attached under `adapter_name` (scale α/r as trained); `merge=True` fuses it into the weights
    and removes the peft layers. Result in `dtype` (default: the base's dtype; B and s stay fp32), in eval mode.
    """
    adapter_dir = Path(adapter_dir)
    model, lora = _load_plain(adapter_dir, base_latent_model, dtype, trained_modules=True)
    return attach_lora(model, adapter_dir, lora, adapter_name, merge)


def attach_lora(
    model: torch.nn.Module, adapter_dir: Path, lora: Mapping[str, torch.Tensor], adapter_name: str, merge: bool
) -> torch.nn.Module:
    """Attach an export's LoRA tensors (if any) to the model as the peft adapter `adapter_name` (fused and removed
    with merge=True); the model in eval mode."""
    if lora:
        model.add_adapter(adapter_lora_config(adapter_dir, lora), adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, dict(lora), adapter_name=adapter_name)
        missing = [name for name in result.missing_keys if is_lora_key(name) and f".{adapter_name}." in name]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"LoRA tensors of {adapter_dir} do not match the model: unexpected {result.unexpected_keys[:5]}, "
                f"missing {missing[:5]}"
            )
        if merge:
            merge_lora(model)
    return model.eval()


def merge_lora(model: AsymFlux2Transformer2DModel) -> AsymFlux2Transformer2DModel:
    """Fuse every attached LoRA into its base weights (W + (α/r)·B·A) and remove the peft layers, in place."""
    if getattr(model, "peft_config", None):
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
    return model


def save_merged(
    model: AsymFlux2Transformer2DModel,
    out_dir: str | PathLike,
    card: str | None = None,
    base_info: Mapping[str, Any] | None = None,
) -> Path:
    """A complete diffusers model directory of a model without peft layers (staged, renamed last)."""
    if getattr(model, "peft_config", None):
        raise ValueError("the model still carries LoRA layers; merge them first (merge_lora)")

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if base_info is not None:
            (staging / BASE_NAME).write_text(json.dumps(dict(base_info), indent=2) + "\n")
        if card is not None:
            (staging / CARD_NAME).write_text(card)

    return write_staged(out_dir, write)


def export_merged(
    adapter_dir: str | PathLike,
    base_latent_model: LatentModel,
    out_dir: str | PathLike,
    dtype: torch.dtype | None = None,
    card: str | None = None,
    base_info: Mapping[str, Any] | None = None,
) -> AsymFlux2Transformer2DModel:
    """Full pixel model with the LoRA fused in, written as a complete diffusers model directory:
    `AsymFlux2Transformer2DModel.from_pretrained(out_dir)` loads it without any base. `base_info` defaults to the
    adapter's own base record (asymflow_base.json), so `asymflow sample` finds the text encoder."""
    model = load_adapter(adapter_dir, base_latent_model, merge=True, dtype=dtype)
    recorded = Path(adapter_dir) / BASE_NAME
    if base_info is None and recorded.is_file():
        base_info = json.loads(recorded.read_text())
    save_merged(model, out_dir, card=card, base_info=base_info)
    return model
