"""What a model family is: where its latent patches enter and leave the transformer, its VAE and time conventions."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from asymflow.patching import FeatureOrder, patchify
from asymflow.timesteps import DynamicShift

PIXEL_CHANNELS = 3  # pixel models see Oklab images (spec §10)


@dataclass(frozen=True)
class PatchIO:
    """One end of the latent token path: the module, how it holds its weight and the feature order of its tokens.

    kind "linear": a Linear on tokens whose features are a latent patch flattened in `order` (FLUX.1/FLUX.2 pack
    2×2 latents before the model); kind "conv": a Conv2d with kernel = stride = latent patch on the latent image
    (SD3's PatchEmbed), whose weight [inner, C, q, q] flattens channel-first.
    """

    module: str
    kind: Literal["linear", "conv"] = "linear"
    order: FeatureOrder = "channel_first"


@dataclass(frozen=True)
class SamplerDefaults:
    """The family's diffusers pipeline defaults that `families.sampling` follows (`source`: the pipeline file read).

    Grid: σ_i = warp(τ_i; S) with τ_i from `grid` — "linspace" τ = linspace(1, 1/n, n) (FluxPipeline and
    QwenImagePipeline pass these sigmas), "train_range" τ = linspace(1, warp(1/1000; S), n) (SD3: the Euler flow
    scheduler's own set_timesteps), "dpm_flow" τ = (1 − 1/1000)·linspace(1, 1/n, n) (Sana's DPM-Solver flow grid) —
    then, with `shift_terminal`, stretched so that the last σ is shift_terminal (Qwen-Image's scheduler). S is a
    static shift or a DynamicShift of the token count. CFG: `cfg_scale` is true CFG u_u + w·(u_c − u_u) (1 = off),
    with `cfg_renorm` rescaled per token to the conditional output's norm (Qwen-Image); `embedded_guidance` is the
    guidance value a guidance-distilled model takes as input (FLUX.1-dev), None for models without it.
    """

    steps: int
    cfg_scale: float
    shift: float | DynamicShift
    grid: Literal["linspace", "train_range", "dpm_flow"] = "linspace"
    shift_terminal: float | None = None
    cfg_renorm: bool = False
    embedded_guidance: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ModelFamily:
    """A family of latent flow-matching transformers the conversion knows (issue 15).

    Latent tokens are fitted and compared in channel-first order (feature c·q² + i·q + j of a q×q latent patch,
    q = `latent_patch`); `read_in` / `read_out` say in which order the model itself reads and writes them, so B is
    permuted to each end's order at conversion. A pixel token is a p×p patch of a 3-channel image, p = VAE factor × q.
    `timestep`: what the latent transformer's forward takes, "sigma" (σ ∈ [0,1]; the model may scale it itself) or
    "t1000" (t = 1000·σ). `latent_normalisation`: "scale_shift" ((z − shift)·scaling, the VAE config's factors),
    "mean_std" ((z − latents_mean)/latents_std per channel, from the VAE config) or "batch_norm" (FLUX.2's
    statistics on 2×2-packed latents). `latent_config`: the values the latent transformer's config must hold.
    `text_inputs` / `text_mask`: the text conditioning's tensor names (see the fields).
    """

    name: str
    title: str
    transformer_class: str  # diffusers class name of the latent transformer (its config's `_class_name`)
    pipeline_classes: tuple[str, ...]  # diffusers pipelines (model_index.json `_class_name`) of the family
    vae_class: str
    latent_channels: int
    latent_patch: int
    vae_factor: int
    read_in: PatchIO
    read_out: PatchIO
    latent_normalisation: Literal["scale_shift", "batch_norm", "mean_std"]
    vae_factors: tuple[float, float] | None  # the released VAE's (scaling, shift); the VAE's own config decides
    timestep: Literal["sigma", "t1000"]
    text_encoders: tuple[str, ...]
    pixel_class_path: str  # "module:Class" of the pixel AsymFlow model, imported when asked for
    latent_config: tuple[tuple[str, tuple[Any, ...]], ...]  # (config key, allowed values): the token geometry
    full_modules: tuple[str, ...]  # trained in full next to a LoRA (spec §9): the patch read-in/out and norm_out
    lora_targets: tuple[str, ...]  # PEFT full-match regexes of the LoRA-adapted Linear layers (any block count)
    sampler: SamplerDefaults | None = None  # families.sampling's defaults (FLUX.2 samples with asymflow.pipeline)
    # The transformer's text keyword arguments as `encode_family_prompts` names them, the mask included even where
    # the pipeline may omit it (what a `prep cache` stores per sample); `text_mask`: which of them is the attention
    # mask over encoder_hidden_states' tokens, for families whose text length varies (None: a fixed length).
    text_inputs: tuple[str, ...] = ("encoder_hidden_states",)
    text_mask: str | None = None
    # How the text reaches the blocks (the dry run's activation model): "joint", text tokens travel with the image
    # tokens through every block (MM-DiT: FLUX, SD3, Qwen-Image); "cross", the blocks' stream is the image tokens only
    # and the text is one shared cross-attention input (Sana). `extra_text_tokens`: tokens the pipeline puts in the
    # stream besides the max_sequence_length text tokens (SD3: the 77 CLIP tokens concatenated before T5's).
    text_stream: Literal["joint", "cross"] = "joint"
    extra_text_tokens: int = 0

    @property
    def pixel_patch(self) -> int:
        return self.vae_factor * self.latent_patch

    @property
    def latent_dim(self) -> int:
        """Width of a latent token: C_lat·q² (the rank r of B)."""
        return self.latent_channels * self.latent_patch**2

    @property
    def pixel_dim(self) -> int:
        """Width of a pixel token: 3·p² (the rows D of B)."""
        return PIXEL_CHANNELS * self.pixel_patch**2

    @property
    def timestep_scale(self) -> float:
        return 1000.0 if self.timestep == "t1000" else 1.0

    def pixel_class(self) -> type:
        module, name = self.pixel_class_path.split(":")
        return getattr(importlib.import_module(module), name)

    def transformer_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def check_latent_config(self, config: Mapping[str, Any]) -> None:
        """Refuse a latent config whose token geometry is not this family's (a ValueError naming the key)."""
        for key, allowed in self.latent_config:
            got = config.get(key)
            if got not in allowed:
                want = " or ".join(str(value) for value in allowed)
                raise ValueError(
                    f"{self.transformer_class} config has {key}={got}; the {self.name} family needs {want}"
                )


def order_index(channels: int, patch: int, order: FeatureOrder) -> torch.Tensor:
    """idx with tokens_in_order = tokens_channel_first[..., idx], for C×q×q patches."""
    ramp = torch.arange(channels * patch * patch).view(1, channels, patch, patch)
    return patchify(ramp, patch, order)[0, 0]


def basis_in_order(family: ModelFamily, basis: torch.Tensor, order: FeatureOrder) -> torch.Tensor:
    """B [D, r] of channel-first tokens → the same map between tokens in `order` (rows and columns permuted):
    if z = Bᵀx in channel-first order, then z_o = B_oᵀ x_o with B_o[g, a] = B[idx_pix[g], idx_lat[a]]."""
    rows = order_index(PIXEL_CHANNELS, family.pixel_patch, order).to(basis.device)
    cols = order_index(family.latent_channels, family.latent_patch, order).to(basis.device)
    return basis[rows][:, cols]


Rule = tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def surgery_rules(family: ModelFamily) -> dict[str, Rule]:
    """The written key map of the family's weight surgery (spec §5.2): product(latent tensor, channel-first B).

    read-in: W_in·B_inᵀ (a conv weight is flattened to [inner, C·q²], multiplied and reshaped to [inner, 3, p, p]:
    a kernel = stride conv is a linear on channel-first patches); its bias is copied. read-out: B_out·W_out and
    B_out·b_out, with B_out in the order the model writes its output tokens.
    """
    read_in, read_out = family.read_in, family.read_out
    p = family.pixel_patch
    if read_in.kind == "conv":
        if read_in.order != "channel_first":
            raise ValueError(f"{family.name}: a conv read-in flattens channel-first, not {read_in.order}")

        def embed(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (w.reshape(w.shape[0], -1) @ b.T).reshape(w.shape[0], PIXEL_CHANNELS, p, p)

        rule_in = "conv W_in·Bᵀ"
    else:

        def embed(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return w @ basis_in_order(family, b, read_in.order).T

        rule_in = "W_in·Bᵀ"

    def project(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return basis_in_order(family, b, read_out.order) @ w

    suffix = "" if read_out.order == "channel_first" else f" ({read_out.order} rows)"
    return {
        f"{read_in.module}.weight": (rule_in, embed),
        f"{read_out.module}.weight": ("B·W_out" + suffix, project),
        f"{read_out.module}.bias": ("B·b_out" + suffix, project),
    }
