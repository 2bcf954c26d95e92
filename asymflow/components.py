"""The base latent model's parts (transformer, VAE, text encoder, tokenizer): the `model:` config section and its loader."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import tiny

Part = Literal["transformer", "vae", "text_encoder", "tokenizer"]
ALL_PARTS: tuple[Part, ...] = ("transformer", "vae", "text_encoder", "tokenizer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The small trained base shipped with the repo (scripts/train_tiny_base.py writes it; see its MODEL_CARD.md).
BUNDLED_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_base"


class BaseModelConfig(BaseModel):
    """Which latent model to convert. `tiny`: built in code from `seed` (tests, demo); `bundled`: the small
    trained transformer/ and vae/ in `path` (default: the repo's assets/tiny_base/) with the tiny text encoder
    and tokenizer built in code from `seed` as for `tiny`; `diffusers`: a local FLUX.2 klein diffusers
    directory with subfolders transformer/, vae/, text_encoder/, tokenizer/ (a hub id works for users with
    network access; tests never use one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tiny", "bundled", "diffusers"] = "tiny"
    path: str | None = None
    seed: int = 0
    text_hidden_layers: tuple[int, ...] = tiny.TINY_TEXT_LAYERS
    max_sequence_length: int = Field(default=tiny.TINY_MAX_LENGTH, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _path_matches_kind(self) -> BaseModelConfig:
        if self.kind == "diffusers" and not self.path:
            raise ValueError("model.path is required when model.kind is 'diffusers'")
        if self.kind == "tiny" and self.path:
            raise ValueError("model.path must be empty when model.kind is 'tiny' (tiny models are built in code)")
        return self

    def fingerprint(self) -> str:
        """A short string identifying the model, recorded next to cached latents/embeddings."""
        if self.kind == "bundled":
            # the weights' content, not just their place: regenerated weights must invalidate old caches
            return f"bundled:{_weights_digest(Path(self.path) if self.path else BUNDLED_PATH)}:seed={self.seed}"
        return f"tiny:seed={self.seed}" if self.kind == "tiny" else f"diffusers:{self.path}"


def _weights_digest(root: Path) -> str:
    """Short sha256 over the safetensors files under `root` (names and bytes, in sorted order)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.safetensors")):
        digest.update(f.relative_to(root).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class BaseComponents:
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None


def load_base_components(cfg: BaseModelConfig, parts: tuple[Part, ...] = ALL_PARTS) -> BaseComponents:
    """Build (tiny) or load (diffusers directory) only the requested parts, in eval mode, frozen."""
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {ALL_PARTS}")
    dtype = DTYPES[cfg.dtype]
    out = BaseComponents()
    if cfg.kind == "tiny":
        builders = {
            "transformer": lambda: tiny.build_tiny_transformer(cfg.seed),
            "vae": lambda: tiny.build_tiny_vae(cfg.seed + 1),
            "text_encoder": lambda: tiny.build_tiny_text_encoder(cfg.seed + 2),
            "tokenizer": tiny.build_tiny_tokenizer,
        }
    elif cfg.kind == "bundled":
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        root = cfg.path or str(BUNDLED_PATH)
        fp32 = torch.float32  # stored fp16; loaded in fp32 and cast below, so `dtype` decides
        builders = {
            "transformer": lambda: Flux2Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=fp32),
            "vae": lambda: AutoencoderKLFlux2.from_pretrained(root, subfolder="vae", torch_dtype=fp32),
            "text_encoder": lambda: tiny.build_tiny_text_encoder(cfg.seed + 2),
            "tokenizer": tiny.build_tiny_tokenizer,
        }
    else:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        # Loaded straight in `dtype`: without torch_dtype diffusers loads fp32 first (36 GB for klein 9B) and the cast
        # below would hold both copies at once.
        builders = {
            "transformer": lambda: Flux2Transformer2DModel.from_pretrained(cfg.path, subfolder="transformer",
                                                                           torch_dtype=dtype),
            "vae": lambda: AutoencoderKLFlux2.from_pretrained(cfg.path, subfolder="vae", torch_dtype=dtype),
            "text_encoder": lambda: Qwen3ForCausalLM.from_pretrained(cfg.path, subfolder="text_encoder", dtype=dtype),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(cfg.path, subfolder="tokenizer"),
        }
    for part in parts:
        obj = builders[part]()
        if isinstance(obj, torch.nn.Module):
            if obj.dtype != dtype:  # casting fp32 -> fp32 would only make diffusers warn
                obj = obj.to(dtype)
            obj = obj.eval().requires_grad_(False)
        setattr(out, part, obj)
    return out
