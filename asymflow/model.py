"""AsymFlux2Transformer2DModel: the FLUX.2 transformer as a pixel-space AsymFlow velocity model (spec §3, §5.1)."""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers import Flux2Transformer2DModel
from diffusers import ModelMixin  # noqa: F401  diffusers' pipeline loader looks base classes up by name in this module
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput
from torch import nn

from asymflow.families.pixel import FP32_BUFFERS  # noqa: F401  (imported from here by convert, export, ...)
from asymflow.families.pixel import PIXEL_KEYS, AsymFlowPixelMixin, check_pixel_config
from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2, check_finite
from asymflow.patching import condition_position_ids, image_position_ids, patchify, text_position_ids
from asymflow.teacher import modules_swapped

Prediction = Literal["velocity", "x0"]


class AsymFlux2Transformer2DModel(AsymFlowPixelMixin, Flux2Transformer2DModel):
    """FLUX.2 backbone on pixel patches with the AsymFlow parameterisation; outputs the full velocity image.

    Differences to the latent model (spec §5.1): `x_embedder: Linear(C·p² → inner)`,
    `proj_out: Linear(inner → C·p²)`, buffers `proj_buffer` B [D, base_rank] and `scale_buffer` s (0-d).
    Forward, per token with D = C·p²:
      k = 1/(s + (1−s)σ), σ̃ = kσ;  û_a = F(k·x_t, σ̃);  û = recover_velocity(û_a, x_t, σ)  (spec §3.4).
    The buffers stay fp32 (fp64 if the model is fp64) when the model is cast to a lower precision, and all
    AsymFlow algebra runs in fp32/fp64; only the backbone runs in the model dtype.
    """

    family_name = "flux2"  # B and s buffers, their fp32 guard, from_pretrained and predict_x0: AsymFlowPixelMixin

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
        dim = check_pixel_config(in_channels, out_channels, patch_size, base_rank, sigma_min, num_timesteps)
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
        self.init_subspace_buffers(dim, base_rank)

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
        backbone_keys = [key for key in inspect.signature(cls.__init__).parameters if key not in ("self", *PIXEL_KEYS)]
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
        tokens, sigma, k, sigma_cal = self._calibrated_tokens(x_t, sigma, prediction)
        width_expected = self.inner_dim if text_projected else self.config.joint_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != width_expected:
            form = "projected (inner_dim)" if text_projected else "raw (joint_attention_dim)"
            raise ValueError(f"encoder_hidden_states must be [B,L,{width_expected}] for {form} text, "
                             f"got {tuple(encoder_hidden_states.shape)}")
        p = self.config.patch_size
        batch, _, height, width = x_t.shape

        if txt_ids is None:
            txt_ids = text_position_ids(encoder_hidden_states.shape[1], device=x_t.device)
        hidden = k.view(batch, 1, 1) * tokens
        img_ids = image_position_ids(height // p, width // p, device=x_t.device)
        if condition_images:
            cond_tokens, cond_ids = self._condition_tokens(condition_images, batch, tokens.dtype, x_t.device)
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

        image = self._recovered_image(u_a, tokens, sigma, prediction, height, width)
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
            return Flux2Transformer2DModel.forward(  # past AsymFlowPixelMixin.forward
                self,
                hidden_states=hidden_states.to(model_dtype),
                encoder_hidden_states=encoder_hidden_states.to(model_dtype),
                timestep=sigma_cal,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
