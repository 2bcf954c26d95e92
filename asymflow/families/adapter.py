"""Adapter export and load for every family: asymflow.export's format with the family's fully trained modules, loaded
onto that family's latent base by its own conversion."""
from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from asymflow.adapter_formats import is_lora_key
from asymflow.export import CONFIG_NAME, WEIGHTS_NAME, attach_lora, export_adapter, read_tensors
from asymflow.trainable import in_module

from .conversion import convert_family_transformer, load_family_transformer
from .detect import detect_family
from .pixel import FP32_BUFFERS


def full_tensor_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The parameters of the model's family's fully trained modules, counted from the root (peft's `.base_layer.`
    left out, LoRA tensors excluded), in the model's order."""
    modules = detect_family(model).full_modules
    names = (name.replace(".base_layer.", ".") for name, _ in model.named_parameters() if not is_lora_key(name))
    return tuple(n for n in names if any(in_module(n, m) for m in modules))


def export_family_adapter(pixel_model: torch.nn.Module, out_dir: str | PathLike, **kwargs: Any) -> Path:
    """`asymflow.export.export_adapter` with the model's family's fully trained modules and tensors."""
    family = detect_family(pixel_model)
    return export_adapter(pixel_model, out_dir, full_modules=family.full_modules,
                          full_tensors=full_tensor_names(pixel_model), **kwargs)


def load_family_adapter(
    adapter_dir: str | PathLike,
    base_latent_model: Any,
    adapter_name: str = "default",
    merge: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Pixel model = the family's latent base converted with the exported B and s ← the exported tensors, + the LoRA
    as an unfused peft adapter (`merge=True` fuses it). The family comes from the export's config.json; a base whose
    config differs from the adapter's in any backbone key is refused with a ValueError naming the keys."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise ValueError(f"{adapter_dir / CONFIG_NAME} does not exist: not an adapter directory")
    family = detect_family(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    tensors = read_tensors(adapter_dir / WEIGHTS_NAME)
    lora = {name: t for name, t in tensors.items() if is_lora_key(name)}
    plain = {name: t for name, t in tensors.items() if not is_lora_key(name)}
    if missing := [name for name in FP32_BUFFERS if name not in plain]:
        raise ValueError(f"{adapter_dir / WEIGHTS_NAME} lacks tensors {missing}")

    latent, owned = load_family_transformer(family, base_latent_model, torch_dtype=dtype)
    expected = family.pixel_class().from_latent_config(
        latent.config, base_rank=config.get("base_rank"), sigma_min=config.get("sigma_min", 1e-4)
    )
    mismatched = {key: (config.get(key), value) for key, value in expected.items()
                  if json.loads(json.dumps(config.get(key))) != json.loads(json.dumps(value))}
    if mismatched:
        details = ", ".join(f"{key}: adapter {a!r} vs base {b!r}" for key, (a, b) in mismatched.items())
        raise ValueError(f"adapter {adapter_dir} does not fit this latent base: {details}")
    model = convert_family_transformer(family, latent, plain["proj_buffer"], plain["scale_buffer"],
                                       sigma_min=expected["sigma_min"], share_weights=owned)
    result = model.load_state_dict(plain, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors {result.unexpected_keys} do not exist in the pixel model")
    if dtype is not None:
        model.to(dtype)
    return attach_lora(model, adapter_dir, lora, adapter_name, merge)

