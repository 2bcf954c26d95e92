"""Adapter export of a pixel AsymFlow transformer (spec §12): write trainable tensors + buffers + LoRA, load them onto a latent base."""
from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from asymflow.convert import LatentModel, convert_transformer, load_latent_transformer
from asymflow.model import FP32_BUFFERS, AsymFlux2Transformer2DModel

CONFIG_NAME = "config.json"  # the pixel model's diffusers config
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"  # peft LoraConfig.save_pretrained format; only when a LoRA is attached

# Fully trained tensors (spec §9) plus the buffers; everything else comes from the latent base.
FULL_TENSORS = ("x_embedder.weight", "proj_out.weight", "norm_out.linear.weight")
EXPORT_TENSORS = FULL_TENSORS + FP32_BUFFERS


def _is_lora_key(name: str) -> bool:
    return ".lora_" in name


def _strip_base_layer(name: str) -> str:
    """peft wraps a targeted Linear as `<module>.base_layer`; exported names are those of the bare model."""
    return name.replace(".base_layer.", ".")


def adapter_state_dict(
    pixel_model: AsymFlux2Transformer2DModel,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """The exported tensors (spec §12: trainable tensors + buffers): `EXPORT_TENSORS`, every other parameter the
    model trains in full (all of them under `trainable.mode: full`), and `<module>.lora_A.weight` /
    `.lora_B.weight` of one adapter.

    `state_dict` (e.g. EMA weights, keys as in `pixel_model.state_dict()`, adapter names included) replaces the
    live weights; it must hold every trained tensor, while missing buffers are taken from the model (spec §9: the
    EMA covers trainable parameters, buffers are copied). Only the config and which parameters require grad are
    read from the model in that case, so it also works for a ZeRO-3 model whose parameters are partitioned.
    """
    source = dict(pixel_model.state_dict() if state_dict is None else state_dict)
    plain = {_strip_base_layer(name): t for name, t in source.items() if not _is_lora_key(name)}
    # A fully trained tensor left out would silently revert to the latent base's re-projected weights on load.
    trained = sorted({_strip_base_layer(name) for name, p in pixel_model.named_parameters()
                      if p.requires_grad and not _is_lora_key(name)} - set(EXPORT_TENSORS))
    tensors: dict[str, torch.Tensor] = {}
    for name in (*EXPORT_TENSORS, *trained):
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


def export_adapter(
    pixel_model: AsymFlux2Transformer2DModel,
    out_dir: str | PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write `config.json`, `diffusion_pytorch_model.safetensors` and, with a LoRA, peft's `adapter_config.json`.

    The adapter name is stripped from LoRA keys; `load_adapter` re-attaches them under a name of its choosing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(pixel_model, state_dict, adapter_name)
    pixel_model.save_config(out)
    if any(_is_lora_key(name) for name in tensors):
        pixel_model.peft_config[adapter_name].save_pretrained(out)
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def _json_normalised(value: Any) -> Any:
    """Config values as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def load_adapter(
    adapter_dir: str | PathLike,
    base_latent_model: LatentModel,
    adapter_name: str = "default",
    merge: bool = False,
    dtype: torch.dtype | None = None,
) -> AsymFlux2Transformer2DModel:
    """Pixel model = latent base (all non-surgery tensors) ← exported tensors, + the LoRA as an unfused peft adapter.

    The base is converted with the exported B and s (`convert_transformer`, which checks B and every shape), then
    the exported tensors overwrite the re-projected ones. The LoRA is attached under `adapter_name` with its saved
    config (scale 1, i.e. the trained α/r); `merge=True` fuses it into the weights and removes the peft layers.
    Result in `dtype` (default: the base's dtype; B and s stay fp32) and in eval mode.
    """
    adapter_dir = Path(adapter_dir)
    config = AsymFlux2Transformer2DModel.load_config(adapter_dir)
    class_name = config.get("_class_name")
    if class_name != AsymFlux2Transformer2DModel.__name__:
        raise ValueError(f"{adapter_dir / CONFIG_NAME} describes {class_name!r}, not {AsymFlux2Transformer2DModel.__name__}")
    latent, owned = load_latent_transformer(base_latent_model, torch_dtype=dtype)
    expected = AsymFlux2Transformer2DModel.from_latent_config(
        latent.config,
        base_rank=config["base_rank"],
        sigma_min=config["sigma_min"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
    )
    mismatched = {
        key: (config.get(key), value)
        for key, value in expected.items()
        if _json_normalised(config.get(key)) != _json_normalised(value)
    }
    if mismatched:
        details = ", ".join(f"{key}: adapter {a!r} vs base {b!r}" for key, (a, b) in mismatched.items())
        raise ValueError(f"adapter does not fit this latent base: {details}")

    tensors = load_file(adapter_dir / WEIGHTS_NAME)
    lora = {name: t for name, t in tensors.items() if _is_lora_key(name)}
    plain = {name: t for name, t in tensors.items() if not _is_lora_key(name)}
    if missing := [name for name in EXPORT_TENSORS if name not in plain]:
        raise ValueError(f"adapter {adapter_dir} lacks tensors {missing}")

    model = convert_transformer(
        latent, plain["proj_buffer"], plain["scale_buffer"], sigma_min=config["sigma_min"], share_weights=owned
    )
    result = model.load_state_dict(plain, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors {result.unexpected_keys} do not exist in the pixel model")
    if dtype is not None:
        model.to(dtype)

    if lora:
        if not (adapter_dir / LORA_CONFIG_NAME).is_file():
            raise ValueError(f"adapter {adapter_dir} holds LoRA tensors but no {LORA_CONFIG_NAME}")
        model.add_adapter(LoraConfig.from_pretrained(adapter_dir), adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, lora, adapter_name=adapter_name)
        missing = [name for name in result.missing_keys if _is_lora_key(name) and f".{adapter_name}." in name]
        if result.unexpected_keys or missing:
            raise ValueError(f"LoRA tensors do not match the model: unexpected {result.unexpected_keys}, missing {missing}")
        if merge:
            model.fuse_lora(lora_scale=1.0)
            model.unload_lora()
    return model.eval()


def export_merged(
    adapter_dir: str | PathLike,
    base_latent_model: LatentModel,
    out_dir: str | PathLike,
    dtype: torch.dtype | None = None,
) -> AsymFlux2Transformer2DModel:
    """Full pixel model with the LoRA fused in, saved with `save_pretrained` (reload with `from_pretrained`)."""
    model = load_adapter(adapter_dir, base_latent_model, merge=True, dtype=dtype)
    model.save_pretrained(out_dir)
    return model
