"""The AsymFlowVR finetuning objective (spec §8): VR coefficient, shifted signal ratio and the step seam."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .oklab import oklab_decode, oklab_encode
from .patching import pack, patchify_unpacked_channels, unpatchify, unpatchify_unpacked_channels
from .perceptual import ImageDistance
from .precision import fp32_algebra
from .timesteps import TimestepSampler


class AsymFlowVRConfig(BaseModel):
    """Hyper-parameters of the AsymFlowVR step; defaults are the AsymFLUX.2 klein recipe (spec §8, §1.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    w_mse: float = Field(10.0, ge=0.0, description="MSE weight; the loss is w_mse·0.5·mean(...) (effective 5)")
    w_perceptual: float = Field(1.0, ge=0.0, description="weight of the gated LPIPS term")
    loss_shift: float | None = Field(0.3, gt=0.0, description="S_l of ρ(σ); None turns ρ ≡ 0 (no VR fade-out)")
    sigma_min_loss: float = Field(5e-2, gt=0.0, description="σ clamp of the 1/σ_c² loss weights")
    vr_eps: float = Field(1e-4, gt=0.0, description="denominator floor of the VR regression")
    use_vr: bool = True
    patch_size: int = Field(16, gt=0, description="pixel patch p (= latent_patch × VAE factor)")
    latent_patch: int = Field(2, gt=0, description="latent tokens are latent_patch² VAE pixels")
    sampler: TimestepSampler = TimestepSampler(logit_normal=True, mean=0.0, std=1.0, shift=17.0)
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability of the negative (empty) prompt")

    @model_validator(mode="after")
    def _patch_sizes_agree(self) -> AsymFlowVRConfig:
        if self.patch_size % self.latent_patch:
            raise ValueError(f"patch_size={self.patch_size} is not a multiple of latent_patch={self.latent_patch}")
        return self


@fp32_algebra
def vr_coefficient(d_full: torch.Tensor, d_low: torch.Tensor, patch_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Per-(sample, channel, patch) least-squares regression of the student error on the teacher error.

    d_full, d_low: [B,C,H,W] -> λ [B,C,1,H/p,W/p] (fp32, fp64 if an input is fp64), no gradient:
        λ = clamp( mean_p²(d_full·d_low) / max(mean_p²(d_low²), eps), 0, 1 ).
    """
    if d_full.shape != d_low.shape or d_full.ndim != 4:
        raise ValueError(f"d_full and d_low must share one [B,C,H,W] shape, got {tuple(d_full.shape)} and {tuple(d_low.shape)}")
    dtype = torch.float64 if torch.float64 in (d_full.dtype, d_low.dtype) else torch.float32
    full = patchify_unpacked_channels(d_full.detach().to(dtype), patch_size)  # b c (h i) (w j) -> b c (i j) h w
    low = patchify_unpacked_channels(d_low.detach().to(dtype), patch_size)
    cov = (full * low).mean(dim=2, keepdim=True)
    var = (low * low).mean(dim=2, keepdim=True)
    return (cov / var.clamp_min(eps)).clamp(0.0, 1.0)


def loss_shift_ratio(sigma: torch.Tensor, loss_shift: float | None = 0.3) -> torch.Tensor:
    """Shifted signal ratio ρ(σ) = (1−σ)² / ((1−σ)² + (S_l·σ)²) (same shape as σ); ρ ≡ 0 when S_l is None.

    ρ = 1/2 at σ = 1/(1 + S_l) (≈ 0.769 for S_l = 0.3); ρ → 1 as σ → 0 and ρ(1) = 0.
    """
    if loss_shift is None:
        return torch.zeros_like(sigma)
    signal = (1.0 - sigma) ** 2
    return signal / (signal + (loss_shift * sigma) ** 2)


@fp32_algebra
def vr_target(x_0: torch.Tensor, d_low: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor, patch_size: int) -> torch.Tensor:
    """VR regression target x̃_0 = x_0 − (1 − ρ)·unpatchify(λ ⊙ d_low) (spec §8 step 8).

    x_0, d_low [B,C,H,W]; λ [B,C,1,H/p,W/p] broadcast over the p² pixels of each patch; ρ [B,1,1,1] or scalar.
    """
    correction = unpatchify_unpacked_channels(lam * patchify_unpacked_channels(d_low, patch_size), patch_size)
    return x_0 - (1.0 - rho) * correction


def perceptual_gate(lam: torch.Tensor, patch_size: int) -> torch.Tensor:
    """g = sqrt(mean_c λ²) per patch, constant inside each patch: λ [B,C,1,h,w] -> [B,1,h·p,w·p]."""
    g = lam.pow(2).mean(dim=1).sqrt()  # [B,1,h,w]
    return g.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


@fp32_algebra
def low_rank_twin(latents: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor | float, patch_size: int) -> torch.Tensor:
    """x_0^low = unpatchify_p( s · pack(z) @ Bᵀ ) (spec §8 step 2), fp32.

    latents z: normalised latent grid [B,r,h,w] (r = 128 for FLUX.2, tokens as in `asymflow.latents`);
    basis B: [D,r] with D = C·p²; returns [B, D/p², h·p, w·p] (≈ P·x_0 by construction of the Procrustes fit).
    """
    b, r, h, w = latents.shape
    if basis.ndim != 2 or basis.shape[1] != r:
        raise ValueError(f"basis shape {tuple(basis.shape)} does not map {r}-dim latent tokens")
    s = torch.as_tensor(scale, dtype=torch.float32, device=latents.device)
    tokens = s * (pack(latents.float()) @ basis.float().T)  # [B, h·w, D]
    return unpatchify(tokens, patch_size, h * patch_size, w * patch_size)


def subspace_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [D,r], s) of a converted model, read from its buffers `proj_buffer` / `scale_buffer`.

    Reading buffers (not weights) is safe under DeepSpeed ZeRO-3: only Parameters are partitioned,
    buffers stay whole on every rank. A wrapper exposing `.module` (DeepSpeed engine, DDP) is unwrapped.
    """
    inner = model if hasattr(model, "proj_buffer") else getattr(model, "module", model)
    if not hasattr(inner, "proj_buffer") or not hasattr(inner, "scale_buffer"):
        raise TypeError(f"{type(model).__name__} has no proj_buffer/scale_buffer; pass a converted AsymFlow model")
    return inner.proj_buffer.detach().float(), inner.scale_buffer.detach().float().reshape(())


def _text_with_dropout(batch: dict[str, torch.Tensor], drop: torch.Tensor) -> torch.Tensor:
    """text_embeds with the rows where `drop` [B] is True replaced by negative_embeds ([B or 1, L, D])."""
    text = batch["text_embeds"]
    if not bool(drop.any()):
        return text
    return _replace_rows(text, batch["negative_embeds"], drop, "negative_embeds", "text_embeds")


def _replace_rows(value: torch.Tensor, negative: torch.Tensor, drop: torch.Tensor, neg_name: str,
                  name: str) -> torch.Tensor:
    """`value` [B,...] with the rows where `drop` [B] is True taken from `negative` ([B or 1, ...], same trailing
    shape); the dtype is `value`'s (integer masks stay integer)."""
    if negative.ndim != value.ndim or negative.shape[0] not in (1, value.shape[0]) or negative.shape[1:] != value.shape[1:]:
        trailing = ",".join(str(d) for d in value.shape[1:])
        raise ValueError(f"{neg_name} {tuple(negative.shape)} must be [B|1,{trailing}] like {name} {tuple(value.shape)}")
    negative = negative.to(value.device, value.dtype).expand_as(value)
    return torch.where(drop.to(value.device).view(-1, *([1] * (value.ndim - 1))), negative, value)


def _extras_with_dropout(batch: dict[str, Any], drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """The family's other named text tensors (`text_extras`: pooled_projections, a text mask, ...), each with the
    dropped rows replaced by its `negative_extras` counterpart: a dropped caption is the whole empty prompt."""
    extras = dict(batch.get("text_extras") or {})
    if not extras or not bool(drop.any()):
        return extras
    negative = batch.get("negative_extras") or {}
    if missing := sorted(set(extras) - set(negative)):
        raise KeyError(f"batch['negative_extras'] lacks {missing}: caption dropout replaces every named text tensor")
    return {name: _replace_rows(value, negative[name], drop, f"negative_extras[{name!r}]", f"text_extras[{name!r}]")
            for name, value in extras.items()}


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNG (CPU + `device`) seeded to `seed`, restoring the caller's state after.

    Model-internal randomness (LoRA dropout) draws from the global RNG; seeding it from the step generator
    makes the whole step a function of that generator. Gradient checkpointing stashes the RNG state at
    forward time, so its recomputation outside this block reproduces the same dropout masks.
    """
    accelerator = device.type != "cpu"
    module = torch.get_device_module(device.type) if accelerator else None
    devices = [device.index if device.index is not None else module.current_device()] if accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else None):
        torch.random.default_generator.manual_seed(seed)
        if accelerator:
            with module.device(devices[0]):
                module.manual_seed(seed)
        yield


def _check_batch(batch: dict[str, torch.Tensor], cfg: AsymFlowVRConfig) -> tuple[int, int, int]:
    required = ("images", "latents", "text_embeds") + (("negative_embeds",) if cfg.caption_dropout > 0 else ())
    for key in required:
        if key not in batch:
            raise KeyError(f"batch is missing {key!r}; expected keys {', '.join(required)}")
    images, latents, text = batch["images"], batch["latents"], batch["text_embeds"]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"batch['images'] must be RGB [B,3,H,W] in [−1,1], got {tuple(images.shape)}")
    bsz, _, height, width = images.shape
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    if latents.ndim != 4 or latents.shape[0] != bsz or latents.shape[2:] != (height // p, width // p):
        raise ValueError(
            f"batch['latents'] must be the latent token grid [B,r,H/{p},W/{p}]=[{bsz},r,{height // p},{width // p}], "
            f"got {tuple(latents.shape)}"
        )
    if text.ndim != 3 or text.shape[0] != bsz:
        raise ValueError(f"batch['text_embeds'] must be [B,L,D] with B={bsz}, got {tuple(text.shape)}")
    for name, value in (batch.get("text_extras") or {}).items():
        if value.shape[:1] != (bsz,):
            raise ValueError(f"batch['text_extras'][{name!r}] must have B={bsz} rows, got {tuple(value.shape)}")
    return bsz, height, width


def asymflow_vr_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    cfg: AsymFlowVRConfig,
    perceptual: ImageDistance | None = None,
    text_projected: bool = False,
    guidance: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One AsymFlowVR loss evaluation (spec §8); returns (loss with graph, detached fp32 scalar metrics).

    batch:
      images          [B,3,H,W]  RGB in [−1,1]; Oklab-encoded here (x_0 = oklab_encode(images)), never by callers
      latents         [B,r,H/p,W/p] normalised latent token grid (`asymflow.latents.encode_latents` layout)
      text_embeds     [B,L,D_txt]  prompt embeddings (student and teacher see the same rows)
      negative_embeds [B|1,L,D_txt] empty-prompt embedding; required only when cfg.caption_dropout > 0
      text_extras     optional {name: [B,...]}: the family's other text tensors (FLUX.1 pooled_projections, a text
                      mask of Qwen-Image or Sana), passed to both models by name; absent for FLUX.2
      negative_extras {name: [B|1,...]}: the empty prompt's; required with text_extras when cfg.caption_dropout > 0.
                      A dropped row gets the negative of every named tensor (text_embeds included)
    guidance: the guidance value of a guidance-distilled model (FLUX.1-dev), given to both models as
    `guidance` [B]; None for models without a guidance embedding (nothing is passed).
    text_projected: text_embeds/negative_embeds are the frozen context_embedder's outputs (a projected text cache),
    passed on to both models, which then skip that layer; the step is otherwise identical.
    Models are called as model(x_t=, sigma=, encoder_hidden_states=) -> velocity [B,3,H,W]; B and s are
    read from the teacher's buffers. `generator` must be a CPU generator: σ, ε, the caption-dropout mask and
    a seed for the models' own randomness (LoRA dropout) are drawn from it on CPU, in that order, so the step
    is reproducible on any device; the caller's global RNG state is left untouched.
    No backward, optimiser, logging or I/O happens here; all algebra is fp32 whatever the model dtype.
    """
    bsz, height, width = _check_batch(batch, cfg)
    device = batch["images"].device
    p = cfg.patch_size

    # Draw order is part of the contract (reproducibility across resumes): σ, ε, dropout mask, model seed.
    sigma = cfg.sampler.sample(bsz, generator, seq_len=height * width, device=device)  # [B]
    eps = torch.randn(bsz, 3, height, width, generator=generator, dtype=torch.float32).to(device)
    drop = torch.rand(bsz, generator=generator) < cfg.caption_dropout
    model_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    text = _text_with_dropout(batch, drop)
    text_kw = {"text_projected": True} if text_projected else {}  # models without the switch still take raw text
    text_kw.update(_extras_with_dropout(batch, drop))  # FLUX.2 batches have none: its calls are unchanged
    if guidance is not None:
        text_kw["guidance"] = torch.full((bsz,), float(guidance), device=device)

    sig = sigma.view(bsz, 1, 1, 1)
    sigma_c = sig.clamp_min(cfg.sigma_min_loss)
    with torch.no_grad():
        x_0 = oklab_encode(batch["images"].float())
    x_t = (1.0 - sig) * x_0 + sig * eps

    with _seeded_global_rng(model_seed, device):
        if cfg.use_vr:
            if teacher.training:
                raise RuntimeError("the teacher must be in eval mode (its recovery uses the eval σ_min = 1e-4)")
            basis, scale = subspace_of(teacher)
            if basis.shape[0] != 3 * p * p:
                raise ValueError(f"teacher basis has {basis.shape[0]} rows but 3·p² = {3 * p * p} for patch_size {p}")
            with torch.no_grad():
                x_0_low = low_rank_twin(batch["latents"].to(device), basis.to(device), scale.to(device), p)
                x_t_low = (1.0 - sig) * x_0_low + sig * eps
                u_low = teacher(x_t=x_t_low, sigma=sigma, encoder_hidden_states=text, **text_kw).float()
                d_low = x_0_low - (x_t_low - sig * u_low)
        u = student(x_t=x_t, sigma=sigma, encoder_hidden_states=text, **text_kw).float()
    x_0_hat = x_t - sig * u

    rho = loss_shift_ratio(sig, cfg.loss_shift)  # [B,1,1,1]
    if cfg.use_vr:
        lam = vr_coefficient(x_0 - x_0_hat.detach(), d_low, p, cfg.vr_eps)  # [B,3,1,h,w]
        target = vr_target(x_0, d_low, lam, rho, p)
        gate = perceptual_gate(lam, p)  # [B,1,H,W]
    else:
        lam = torch.zeros(bsz, 3, 1, height // p, width // p, device=device)
        target = x_0
        gate = torch.ones(bsz, 1, height, width, device=device)  # without VR the perceptual term is ungated

    loss_mse = cfg.w_mse * 0.5 * ((x_0_hat - target) ** 2 / sigma_c**2).mean()

    if perceptual is not None and cfg.w_perceptual > 0:
        with torch.no_grad():
            image_target = oklab_decode(x_0)  # the clean x_0, not the VR target (spec §8 step 10)
        distance = perceptual(oklab_decode(x_0_hat), image_target).float()  # [B,1,H,W]
        if distance.shape != (bsz, 1, height, width):
            raise ValueError(f"image distance must return a [B,1,H,W] map, got {tuple(distance.shape)}")
        loss_perceptual = cfg.w_perceptual * (distance * gate * (rho / sigma_c**2)).mean()
    else:
        loss_perceptual = torch.zeros((), device=device)

    loss = loss_mse + loss_perceptual
    metrics = {
        "loss": loss,
        "loss_mse": loss_mse,
        "loss_perceptual": loss_perceptual,
        "vr_lambda_mean": lam.mean(),
        "sigma_mean": sigma.mean(),
        "rho_mean": rho.mean(),
        "x0_mse_student": ((x_0_hat - x_0) ** 2).mean(),
        "x0_mse_teacher": (d_low**2).mean() if cfg.use_vr else torch.zeros((), device=device),
        "caption_dropped_frac": drop.float().mean().to(device),
    }
    return loss, {k: v.detach().float() for k, v in metrics.items()}
