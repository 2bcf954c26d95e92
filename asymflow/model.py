"""AsymFlux2Transformer2DModel: the FLUX.2 transformer as a pixel-space AsymFlow velocity model (spec §3, §5.1)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any, Literal

import torch
from diffusers import Flux2Transformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput
from torch import nn

from asymflow.parameterisation import (
    SIGMA_MIN_EVAL_FLUX2,
    SIGMA_MIN_TRAIN,
    algebra_dtype,
    calibrate,
    check_finite,
    recover_velocity,
    recover_x0,
)
from asymflow.patching import (
    condition_position_ids,
    image_position_ids,
    patchify,
    text_position_ids,
    unpatchify,
)
from asymflow.teacher import modules_swapped

Prediction = Literal["velocity", "x0"]

# Buffers that hold the AsymFlow algebra (B and s): never stored below fp32 (DESIGN §2).
FP32_BUFFERS = ("proj_buffer", "scale_buffer")

# Config keys that differ between the latent and the pixel model; every other key describes the shared backbone.
_PIXEL_KEYS = ("patch_size", "in_channels", "out_channels", "base_rank", "sigma_min", "num_timesteps")


class AsymFlux2Transformer2DModel(Flux2Transformer2DModel):
    """FLUX.2 backbone on pixel patches with the AsymFlow parameterisation; outputs the full velocity image.

    Differences to the latent model (spec §5.1): `x_embedder: Linear(C·p² → inner)`,
    `proj_out: Linear(inner → C·p²)`, buffers `proj_buffer` B [D, base_rank] and `scale_buffer` s (0-d).
    Forward, per token with D = C·p²:
      k = 1/(s + (1−s)σ), σ̃ = kσ;  û_a = F(k·x_t, σ̃);  û = recover_velocity(û_a, x_t, σ)  (spec §3.4).
    The buffers stay fp32 (fp64 if the model is fp64) when the model is cast to a lower precision, and all
    AsymFlow algebra runs in fp32/fp64; only the backbone runs in the model dtype.
    """

    _keep_in_fp32_modules = list(FP32_BUFFERS)  # from_pretrained(torch_dtype=bf16) loads B and s as fp32

    @register_to_config
    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_layers: int = 8,
        num_single_layers: int = 24,
        attention_head_dim: int = 128,
        num_attention_heads: int = 32,
        joint_attention_dim: int = 12288,
        timestep_guidance_channels: int = 256,
        mlp_ratio: float = 3.0,
        axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32),
        rope_theta: int = 2000,
        eps: float = 1e-6,
        guidance_embeds: bool = False,
        base_rank: int = 128,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        num_timesteps: int = 1,
    ):
        if out_channels not in (None, in_channels):
            raise ValueError(f"out_channels={out_channels} must equal in_channels={in_channels} (velocity image)")
        dim = in_channels * patch_size * patch_size
        if not 0 <= base_rank <= dim:
            raise ValueError(f"base_rank={base_rank} must lie in [0, C·p²={dim}]")
        if num_timesteps != 1:
            raise ValueError(f"num_timesteps={num_timesteps} is not supported: the timestep is σ (num_timesteps=1)")
        if sigma_min <= 0:
            raise ValueError(f"sigma_min={sigma_min} must be positive")
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            timestep_guidance_channels=timestep_guidance_channels,
            mlp_ratio=mlp_ratio,
            axes_dims_rope=axes_dims_rope,
            rope_theta=rope_theta,
            eps=eps,
            guidance_embeds=guidance_embeds,
        )
        # The parent embeds `in_channels` features per token; pixel tokens are whole C·p² patches.
        self.x_embedder = nn.Linear(dim, self.inner_dim, bias=False)
        self.register_buffer("proj_buffer", torch.eye(dim, base_rank, dtype=torch.float32))  # [I_r; 0]
        self.register_buffer("scale_buffer", torch.tensor(1.0, dtype=torch.float32))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PathLike, *args: Any, **kwargs: Any):
        """diffusers' `from_pretrained`, refusing a directory that holds only part of the model (an adapter export:
        diffusers would leave the missing tensors on the meta device and fail at the first forward)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # missing_keys covers both loaders: low_cpu_mem_usage leaves them on meta, the other path random.
        missing = sorted(info["missing_keys"])
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds only part of an {cls.__name__} ({len(missing)} tensors "
                f"missing, e.g. {missing[0]}): it is an adapter; load it with asymflow.load_adapter(dir, latent_base)"
            )
        return (model, info) if want_info else model

    @classmethod
    def from_latent_config(
        cls,
        latent_config: Mapping[str, Any],
        base_rank: int | None = None,
        sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
        patch_size: int = 16,
        in_channels: int = 3,
    ) -> dict[str, Any]:
        """Pixel config (for `from_config`) from a latent Flux2 config: same backbone, pixel I/O widths.

        `base_rank` defaults to the latent token width (in_channels, 128 for FLUX.2); the latent model
        must use patch_size 1 (FLUX.2 packs 2×2 latents itself, so one latent token = one 16×16 pixel patch).
        """
        latent_patch = latent_config.get("patch_size", 1)
        if latent_patch != 1:
            raise ValueError(f"latent model has patch_size={latent_patch}; only patch_size=1 (FLUX.2) is supported")
        latent_in = latent_config["in_channels"]
        latent_out = latent_config.get("out_channels") or latent_in
        if latent_out != latent_in:
            raise ValueError(f"latent in_channels={latent_in} and out_channels={latent_out} differ")
        backbone_keys = [key for key in inspect.signature(cls.__init__).parameters if key not in ("self", *_PIXEL_KEYS)]
        config = {key: latent_config[key] for key in backbone_keys if key in latent_config}
        return {
            **config,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "out_channels": None,
            "base_rank": latent_in if base_rank is None else base_rank,
            "sigma_min": sigma_min,
            "num_timesteps": 1,
        }

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "AsymFlux2Transformer2DModel":
        """Module casts (`.to(bf16)`, `.half()`, …) move B and s but never store them below fp32."""
        before = {name: self._buffers[name] for name in FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
                # Re-cast from the pre-cast value so no precision is lost on the way.
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        prediction: Prediction = "velocity",
        return_dict: bool = False,
        condition_images: Sequence[torch.Tensor] | None = None,
        text_projected: bool = False,
    ) -> torch.Tensor | Flux2Transformer2DModelOutput:
        """Velocity û = ε̂ − x̂_0 (or x̂_0 with prediction="x0") of a noisy image.

        x_t [B,C,H,W] (H, W multiples of p), sigma [B] or scalar in [0,1] (1 = noise),
        encoder_hidden_states [B,L,joint_attention_dim], txt_ids [L,4] (default: `text_position_ids(L)`).
        Returns [B,C,H,W] in fp32 (fp64 if x_t, sigma or the buffers are fp64), or
        `Flux2Transformer2DModelOutput(sample=...)` with return_dict=True.
        The recovery clamp σ_min is 1e-6 in training mode and `config.sigma_min` in eval mode (spec §3.5);
        "x0" uses the division-free form x̂_0 = s·k·P(x_t − σ·û_a) − s·P⊥û_a.
        Under an autocast context only `_backbone` (the blocks) autocasts; calibration and recovery stay fp32.
        condition_images: reference images (spec §5.4), each [B or 1,C,H_i,W_i] in the model's pixel space (normalised
        Oklab), clean: their tokens are x_ref/s (not k·x: at σ = 0, k = 1/s), appended after the noisy tokens with
        RoPE time coordinate 10·(i+1) (FLUX.2's `_prepare_image_ids`), and their outputs are discarded.
        text_projected: encoder_hidden_states is already `context_embedder`'s output [B,L,inner_dim] (a projected text
        cache, exact while context_embedder is frozen); the backbone then skips that layer.
        """
        if prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
        if x_t.ndim != 4 or x_t.shape[1] != self.config.in_channels:
            raise ValueError(f"x_t must be [B,{self.config.in_channels},H,W], got {tuple(x_t.shape)}")
        check_finite(x_t=x_t, sigma=sigma)
        width_expected = self.inner_dim if text_projected else self.config.joint_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != width_expected:
            form = "projected (inner_dim)" if text_projected else "raw (joint_attention_dim)"
            raise ValueError(f"encoder_hidden_states must be [B,L,{width_expected}] for {form} text, "
                             f"got {tuple(encoder_hidden_states.shape)}")
        p = self.config.patch_size
        batch, _, height, width = x_t.shape
        basis, scale = self.proj_buffer, self.scale_buffer
        sigma = torch.as_tensor(sigma, device=x_t.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or have shape [B]=[{batch}], got {tuple(sigma.shape)}")
        dtype = algebra_dtype(x_t, sigma, basis)
        sigma = sigma.to(dtype)
        tokens = patchify(x_t.to(dtype), p, "channel_first")  # [B,N,D]; checks H, W divisible by p
        k, sigma_cal = calibrate(sigma, scale)

        if txt_ids is None:
            txt_ids = text_position_ids(encoder_hidden_states.shape[1], device=x_t.device)
        hidden = k.view(batch, 1, 1) * tokens
        img_ids = image_position_ids(height // p, width // p, device=x_t.device)
        if condition_images:
            cond_tokens, cond_ids = self._condition_tokens(condition_images, batch, dtype, x_t.device)
            hidden, img_ids = torch.cat([hidden, cond_tokens], dim=1), torch.cat([img_ids, cond_ids])
        u_a = self._backbone(
            hidden,
            encoder_hidden_states,
            sigma_cal,
            img_ids,
            txt_ids,
            guidance=guidance,
            joint_attention_kwargs=joint_attention_kwargs,
            text_projected=text_projected,
        )[:, : tokens.shape[1]]  # the condition tokens' outputs are discarded

        # validate=False: a non-finite network output must reach the trainer's skip logic, not raise here.
        if prediction == "velocity":
            sigma_min = SIGMA_MIN_TRAIN if self.training else self.config.sigma_min
            out = recover_velocity(u_a, tokens, sigma, basis, scale, sigma_min=sigma_min, validate=False)
        else:
            out = recover_x0(u_a, tokens, sigma, basis, scale, validate=False)
        image = unpatchify(out, p, height, width, "channel_first")
        return Flux2Transformer2DModelOutput(sample=image) if return_dict else image

    def _condition_tokens(
        self, images: Sequence[torch.Tensor], batch: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference images → (tokens [B, ΣN_i, D] = patchify(x_ref)/s, RoPE ids [ΣN_i, 4] with t = 10·(i+1))."""
        p, channels = self.config.patch_size, self.config.in_channels
        tokens, ids = [], []
        for i, image in enumerate(images):
            if image.ndim != 4 or image.shape[1] != channels or image.shape[0] not in (1, batch):
                raise ValueError(
                    f"condition image {i} must be [{batch} or 1,{channels},H,W], got {tuple(image.shape)}"
                )
            check_finite(**{f"condition_image_{i}": image})
            h, w = image.shape[-2] // p, image.shape[-1] // p
            t = patchify(image.to(device=device, dtype=dtype), p, "channel_first") / self.scale_buffer.to(dtype)
            tokens.append(t.expand(batch, -1, -1))
            ids.append(condition_position_ids(h, w, i, device=device))
        return torch.cat(tokens, dim=1), torch.cat(ids)

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        text_projected: bool = False,
    ) -> torch.Tensor:
        """û_a = F(y, σ̃) [B,N,D]: the FLUX.2 blocks on calibrated pixel tokens y = k·x_t, in the model dtype.

        The only part of the forward that runs under the caller's autocast context (spec §3.4a).
        text_projected: the parent's forward applies `self.context_embedder` first; for context that is already its
        output, that layer is swapped for an identity for the call (a module swap, not a weight read: sound under
        ZeRO-3, and the swapped-out layer's parameters are simply not gathered).
        """
        model_dtype = self.dtype
        skip = {"context_embedder": nn.Identity()} if text_projected else {}
        with modules_swapped(self, skip):
            return super().forward(
                hidden_states=hidden_states.to(model_dtype),
                encoder_hidden_states=encoder_hidden_states.to(model_dtype),
                timestep=sigma_cal,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

    def predict_x0(
        self, x_t: torch.Tensor, sigma: torch.Tensor | float, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """x̂_0 [B,C,H,W] (calls `forward(..., prediction="x0")`, so wrappers' hooks still run)."""
        return self(x_t, sigma, encoder_hidden_states, prediction="x0", **kwargs)
