"""The base latent model's parts (transformer, VAE, text encoder, tokenizer): the `model:` config section and its loader."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from . import tiny

Part = Literal["transformer", "vae", "text_encoder", "tokenizer"]
ALL_PARTS: tuple[Part, ...] = ("transformer", "vae", "text_encoder", "tokenizer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The small trained base shipped with the repo (scripts/train_tiny_base.py writes it; see its MODEL_CARD.md).
BUNDLED_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_base"
# `model.family`: the names of asymflow.families.FAMILIES (a test keeps them equal). TRAINING_FAMILY is FLUX.2, the
# project's first family and the default of every model that names none (tiny, bundled); the others' conversion is
# proven (seamless-init identity, adapter round trip).
FamilyName = Literal["flux2", "flux1", "sd3", "qwen_image", "sana"]
TRAINING_FAMILY = "flux2"
# Data prep (`prep cache`, `prep subspace`) is wired for these; it validates its `model:` section with
# `context={"families": DATA_PREP_FAMILIES}` and calls `check_family(DATA_PREP_FAMILIES)`.
DATA_PREP_FAMILIES: tuple[str, ...] = get_args(FamilyName)
# `asymflow train` is wired for these (loader, objective, model build, checkpoint, export: generic over the family
# registry). A family joins once its data prep exists (it is in DATA_PREP_FAMILIES) and its tiny run passes
# tests/orchestration/test_family_train.py: every family does.
TRAINING_FAMILIES: tuple[str, ...] = get_args(FamilyName)
# `asymflow sample` takes every family (FLUX.2: asymflow.pipeline; the others: asymflow.families.pipeline);
# `asymflow serve` and `compare` remain FLUX.2's (they refuse the others themselves).
SAMPLING_FAMILIES: tuple[str, ...] = get_args(FamilyName)


def _family_names() -> str:
    from .families import FAMILIES

    return ", ".join(FAMILIES)


def unwired_family_message(name: str, use: Literal["training", "sampling"] = "training") -> str:
    """Why a family is refused by training (outside TRAINING_FAMILIES), sampling (outside SAMPLING_FAMILIES) or data
    prep (outside DATA_PREP_FAMILIES); `use` is what refuses it."""
    from .families import get_family

    unwired = [what for what, families in (("training", TRAINING_FAMILIES), ("data prep", DATA_PREP_FAMILIES),
                                           ("sampling", SAMPLING_FAMILIES)) if name not in families]
    listed = unwired[0] if len(unwired) == 1 else f"{', '.join(unwired[:-1])} and {unwired[-1]}"
    supported = TRAINING_FAMILIES if use == "training" else SAMPLING_FAMILIES
    return (f"{name} ({get_family(name).title}) is not supported for {use} yet: its conversion is proven "
            f"(seamless-init identity, adapter round trip; asymflow.families) but {listed} "
            f"{'is' if len(unwired) == 1 else 'are'} not wired for it; the supported {use} "
            f"{'family is' if len(supported) == 1 else 'families are'} {', '.join(supported)}")


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
    family: FamilyName | None = Field(
        None, description="the latent model family; when omitted, read from a local model.path's model_index.json or "
        "transformer/config.json (`detected_family`); training takes TRAINING_FAMILIES, data prep and sampling every "
        "family")

    @field_validator("family", mode="before")
    @classmethod
    def _known_family(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value not in get_args(FamilyName):
            raise ValueError(f"unknown model family {value!r}; supported families: {_family_names()}")
        # Training accepts TRAINING_FAMILIES; data prep passes its own set as validation context.
        if value not in (None, *(info.context or {}).get("families", TRAINING_FAMILIES)):
            raise ValueError(unwired_family_message(value))
        return value

    @model_validator(mode="after")
    def _path_matches_kind(self) -> BaseModelConfig:
        if self.kind == "diffusers" and not self.path:
            raise ValueError("model.path is required when model.kind is 'diffusers'")
        if self.kind == "tiny" and self.path:
            raise ValueError("model.path must be empty when model.kind is 'tiny' (tiny models are built in code)")
        return self

    def detected_family(self) -> str | None:
        """The family of the model the config names, from its files: flux2 for the in-code tiny and the bundled base;
        a local diffusers directory's model_index.json, else its transformer/config.json; None when there is nothing
        local to read (a hub id, a URL, a directory without either file: the path checks say what is missing).
        ValueError for a class no family knows."""
        from .families import detect_family

        if self.kind != "diffusers":
            return TRAINING_FAMILY
        root = Path(self.path).expanduser()
        if "://" in self.path or not root.is_dir():
            return None
        for source in (root / "model_index.json", root / "transformer" / "config.json"):
            if source.is_file():
                return detect_family(source).name
        return None

    def check_family(self, families: tuple[str, ...] = TRAINING_FAMILIES) -> str:
        """The model's family, given (`family`) or detected (`detected_family`), if it is one of `families` (those
        training can use, by default); ValueError (one line, naming model.path) for a model of another family or one
        that contradicts `family`."""
        try:
            detected = self.detected_family()
        except ValueError as exc:
            raise ValueError(f"model.path: {exc}") from None
        if self.kind != "diffusers" and self.family not in (None, TRAINING_FAMILY):
            raise ValueError(f"model.family {self.family!r} contradicts model.kind {self.kind!r}, a {TRAINING_FAMILY} model "
                             f"built in code or shipped with asymflow; use model.kind diffusers with a {self.family} "
                             "pipeline directory as model.path")
        if self.family is not None and detected is not None and detected != self.family:
            raise ValueError(f"model.family {self.family!r} contradicts model.path {self.path}, which holds a "
                             f"model of family {detected}; fix model.family or leave it out to use the detected family")
        family = self.family or detected or TRAINING_FAMILY
        if family not in families:
            raise ValueError(f"model.path {self.path} holds a model of family {family}, and "
                             f"{unwired_family_message(family)}")
        return family

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


CONTEXT_EMBEDDER = "context_embedder"


def _local_transformer_dir(cfg: BaseModelConfig) -> Path | None:
    """The base transformer's local diffusers folder, or None (tiny models; hub ids)."""
    if cfg.kind == "bundled":
        return Path(cfg.path or BUNDLED_PATH) / "transformer"
    if cfg.kind == "diffusers" and Path(cfg.path).expanduser().is_dir():
        return Path(cfg.path).expanduser() / "transformer"
    return None


def load_context_embedder(cfg: BaseModelConfig) -> torch.nn.Linear:
    """The base transformer's `context_embedder` alone, frozen, with the weight `load_base_components` would give it.

    From a local directory only its tensor is read (klein 9B: 100 MB of 18 GB); tiny models and hub ids build or
    load the whole transformer and keep this layer.
    """
    root = _local_transformer_dir(cfg)
    if root is None:
        return getattr(load_base_components(cfg, ("transformer",)).transformer, CONTEXT_EMBEDDER)
    import json

    from safetensors import safe_open

    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json (expected the base transformer's diffusers folder)")
    config = json.loads((root / "config.json").read_text())
    name = f"{CONTEXT_EMBEDDER}.weight"
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                weight = f.get_tensor(name)
                has_bias = f"{CONTEXT_EMBEDDER}.bias" in f.keys()
                break
    else:
        raise FileNotFoundError(f"no {name} in the safetensors files of {root}")
    if has_bias:
        raise ValueError(f"{root}: {CONTEXT_EMBEDDER} has a bias; FLUX.2's has none")
    inner, joint = config["num_attention_heads"] * config["attention_head_dim"], config["joint_attention_dim"]
    if tuple(weight.shape) != (inner, joint):
        raise ValueError(f"{root}: {name} is {tuple(weight.shape)}, the config says ({inner}, {joint})")
    layer = torch.nn.Linear(joint, inner, bias=False, device="meta")
    # The stored tensor cast once to the load dtype, as diffusers' torch_dtype (and the bundled fp32 load + cast) do.
    layer.weight = torch.nn.Parameter(weight.to(DTYPES[cfg.dtype]), requires_grad=False)
    return layer.eval()


def context_embedder_fingerprint(layer: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the layer's parameters: names, dtypes, shapes and bytes. A projected text cache
    records it, so it is only ever used with the very layer (weights and dtype) that computed it."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(layer.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
