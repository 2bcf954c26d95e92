"""The LoRA of an export in the formats other loaders read: peft's PeftModel, diffusers' load_lora_adapter, and the
official adapter layout (no adapter_config.json: the LoRA settings are read off the tensors)."""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig

PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix (the wrapped model is `base_model.model`)
DIFFUSERS_PREFIX = "transformer."  # what load_lora_adapter / Flux2LoraLoaderMixin.load_lora_weights strip by default
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_LORA_SUFFIX = re.compile(r"\.lora_[AB]\.weight$")


def is_lora_key(name: str) -> bool:
    return ".lora_" in name


def peft_state_dict(
    lora: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`adapter_model.safetensors` as PeftModel.save_pretrained writes it: LoRA tensors and the `modules_to_save`
    tensors (the fully trained modules, stored under the wrapped module's own names) behind `base_model.model.`."""
    return {PEFT_PREFIX + name: t for name, t in {**lora, **full}.items()}


def peft_config(config: LoraConfig, modules_to_save: Sequence[str], base_model: str | None) -> LoraConfig:
    """The trained LoraConfig with the fully trained modules as `modules_to_save` and the base named, inference mode."""
    data = config.to_dict()
    data.update(modules_to_save=list(modules_to_save), base_model_name_or_path=base_model, inference_mode=True)
    data.pop("peft_type", None)
    return LoraConfig(**{k: v for k, v in data.items() if k in LoraConfig.__dataclass_fields__})


def diffusers_lora_file(lora: Mapping[str, torch.Tensor], config: LoraConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of `pytorch_lora_weights.safetensors` in diffusers' pipeline LoRA layout.

    Keys `transformer.<module>.lora_A.weight`; the LoraConfig rides in the metadata under `lora_adapter_metadata`
    with the same `transformer.` prefix (load_lora_adapter filters metadata keys by prefix like tensor keys), so
    rank, alpha and targets are read back exactly instead of being guessed (diffusers assumes alpha = rank).
    The fully trained modules are not LoRA and diffusers loads none: they are part of the pixel base.
    """
    data = config.to_dict()
    data.pop("modules_to_save", None)  # diffusers would wrap them as copies of the base's tensors
    for key, value in data.items():
        if isinstance(value, set):  # to_dict keeps sets (target_modules as a list of names)
            data[key] = sorted(value)
    metadata = {DIFFUSERS_PREFIX + k: v for k, v in data.items()}
    tensors = {DIFFUSERS_PREFIX + name: t for name, t in lora.items()}
    return tensors, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True, default=str)}


def lora_config_from_tensors(lora: Mapping[str, torch.Tensor]) -> LoraConfig:
    """LoraConfig implied by the official layout's tensors: rank from each `lora_A.weight` [r, in], alpha = rank
    (scale 1, the reference recipe), targets = exactly the modules that carry LoRA tensors.

    Modules of another rank than the most common one get `rank_pattern` / `alpha_pattern` entries.
    """
    ranks: dict[str, int] = {}
    for name, tensor in lora.items():
        if name.endswith(".lora_A.weight"):
            if tensor.ndim != 2:
                raise ValueError(f"LoRA tensor {name} has shape {tuple(tensor.shape)}; expected [rank, in_features]")
            ranks[name.removesuffix(".lora_A.weight")] = int(tensor.shape[0])
    modules_b = {_LORA_SUFFIX.sub("", n) for n in lora if n.endswith(".lora_B.weight")}
    if set(ranks) != modules_b or not ranks:
        unpaired = sorted(set(ranks) ^ modules_b)
        raise ValueError(f"LoRA tensors must come in lora_A/lora_B pairs; unpaired modules: {unpaired[:5]}")
    for module, r in ranks.items():
        b = lora[f"{module}.lora_B.weight"]
        if b.ndim != 2 or b.shape[1] != r:
            raise ValueError(f"{module}.lora_B.weight has shape {tuple(b.shape)}; expected [out_features, {r}]")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {module: r for module, r in ranks.items() if r != rank}
    # A fullmatch regex of the exact names: a plain list would also match any module whose name ends with one.
    targets = "|".join(re.escape(module) for module in sorted(ranks))
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=f"(?:{targets})",
        rank_pattern={f"^{re.escape(m)}$": r for m, r in others.items()},
        alpha_pattern={f"^{re.escape(m)}$": r for m, r in others.items()},
        lora_dropout=0.0,
        init_lora_weights=True,
    )
