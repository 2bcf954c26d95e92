"""The AsymFlow pixel model around any family's backbone: calibrate pixel tokens, run the blocks, recover (spec §3)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any, ClassVar, Literal

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
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
from asymflow.patching import patchify, unpatchify

from .core import PIXEL_CHANNELS, ModelFamily

Prediction = Literal["velocity", "x0"]
FP32_BUFFERS = ("proj_buffer", "scale_buffer")  # B and s: never stored below fp32 (DESIGN §2)
# Config keys that differ between the latent and the pixel model; every other key describes the shared backbone.
PIXEL_KEYS = ("patch_size", "in_channels", "out_channels", "base_rank", "sigma_min", "num_timesteps")


def check_pixel_config(in_channels: int, out_channels: int | None, patch_size: int, base_rank: int,
                       sigma_min: float, num_timesteps: int) -> int:
    """Validate the AsymFlow part of a pixel config; returns the token width D = C·p²."""
    if out_channels not in (None, in_channels):
        raise ValueError(f"out_channels={out_channels} must equal in_channels={in_channels} (velocity image)")
    dim = in_channels * patch_size * patch_size
    if not 0 <= base_rank <= dim:
        raise ValueError(f"base_rank={base_rank} must lie in [0, C·p²={dim}]")
    if num_timesteps != 1:
        raise ValueError(f"num_timesteps={num_timesteps} is not supported: the timestep is σ (num_timesteps=1)")
    if sigma_min <= 0:
        raise ValueError(f"sigma_min={sigma_min} must be positive")
    return dim


def parent_kwargs(parent: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `parent.__init__` taken by name from `values` (a pixel class's `locals()`): the backbone's
    config passes through unchanged; the AsymFlow keys (base_rank, sigma_min, ...) stay behind."""
    names = inspect.signature(parent.__init__).parameters
    return {name: values[name] for name in names if name != "self" and name in values}


class AsymFlowPixelMixin:
    """Pixel-space AsymFlow velocity model on top of a diffusers latent transformer class (put first in the bases).

    Forward, per channel-first pixel token x (D = 3·p²): k = 1/(s + (1−s)σ), σ̃ = kσ; û_a = F(k·x, σ̃) from the
    family's blocks (`_backbone`, tokens in and out channel-first); û = recover_velocity(û_a, x_t, σ) (spec §3.4).
    Buffers `proj_buffer` B [D, base_rank] and `scale_buffer` s stay fp32 (fp64 for fp64) under module casts, and
    all AsymFlow algebra runs in fp32/fp64; only `_backbone` runs in the model dtype (and under autocast).
    """

    family_name: ClassVar[str]
    _keep_in_fp32_modules = list(FP32_BUFFERS)  # from_pretrained(torch_dtype=bf16) loads B and s as fp32

    @classmethod
    def family(cls) -> ModelFamily:
        from .registry import get_family

        return get_family(cls.family_name)

    def init_subspace_buffers(self, dim: int, base_rank: int) -> None:
        self.register_buffer("proj_buffer", torch.eye(dim, base_rank, dtype=torch.float32))  # [I_r; 0]
        self.register_buffer("scale_buffer", torch.tensor(1.0, dtype=torch.float32))

    def init_pixel_backbone(self, parent: type, values: Mapping[str, Any]) -> None:
        """The body of a pixel class's `__init__` (`values` = its `locals()`): check the AsymFlow keys, build the
        `parent` backbone from its own arguments, give a linear read-in C·p² inputs (its bias kept; a conv read-in
        already has kernel p on C channels), and add B and s."""
        keys = ("in_channels", "out_channels", "patch_size", "base_rank", "sigma_min", "num_timesteps")
        dim = check_pixel_config(*(values[key] for key in keys))
        parent.__init__(self, **parent_kwargs(parent, values))
        read_in = self.family().read_in
        if read_in.kind == "linear":  # the parent embeds `in_channels` features per token
            bias = self.get_submodule(read_in.module).bias is not None
            self.set_submodule(read_in.module, nn.Linear(dim, self.inner_dim, bias=bias))
        self.init_subspace_buffers(dim, values["base_rank"])

    def rebuild_unsaved_state(self) -> None:
        """Rebuild tensors a module keeps outside its state dict, after a build on the meta device took the state
        dict as storage (they would still be meta). None here; families with such tensors override it."""

    @classmethod
    def pixel_overrides(cls, latent_config: Mapping[str, Any]) -> dict[str, Any]:
        """Backbone keys whose pixel value differs from the latent one: a conv patch embedding's `sample_size` is in
        latent pixels and its grid (sample_size / patch) must stay the latent model's (so must a positional table
        built from it), so it scales by the VAE factor."""
        family = cls.family()
        if family.read_in.kind == "conv" and "sample_size" in latent_config:
            return {"sample_size": latent_config["sample_size"] * family.vae_factor}
        return {}

    @classmethod
    def from_latent_config(
        cls, latent_config: Mapping[str, Any], base_rank: int | None = None, sigma_min: float = SIGMA_MIN_EVAL_FLUX2
    ) -> dict[str, Any]:
        """Pixel config (for `from_config`) from the family's latent config: same backbone, pixel I/O."""
        family = cls.family()
        family.check_latent_config(latent_config)
        keys = [key for key in inspect.signature(cls.__init__).parameters if key not in ("self", *PIXEL_KEYS)]
        config = {key: latent_config[key] for key in keys if key in latent_config}
        return {
            **config,
            **cls.pixel_overrides(latent_config),
            "patch_size": family.pixel_patch,
            "in_channels": PIXEL_CHANNELS,
            "out_channels": PIXEL_CHANNELS,
            "base_rank": family.latent_dim if base_rank is None else base_rank,
            "sigma_min": sigma_min,
            "num_timesteps": 1,
        }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PathLike, *args: Any, **kwargs: Any):
        """diffusers' `from_pretrained`, refusing a directory that holds only part of the model (an adapter export:
        diffusers would leave the missing tensors on the meta device and fail at the first forward)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # missing_keys covers both loaders: low_cpu_mem_usage leaves them on meta, the other path random.
        missing = sorted(info["missing_keys"])
        if missing:
            how = "load it with asymflow.load_adapter(dir, latent_base)" if cls.family_name == "flux2" else (
                "load it with asymflow.families.adapter.load_family_adapter(dir, latent_base)")
            raise ValueError(
                f"{pretrained_model_name_or_path} holds only part of an {cls.__name__} ({len(missing)} tensors "
                f"missing, e.g. {missing[0]}): it is an adapter; {how}"
            )
        return (model, info) if want_info else model

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
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
        prediction: Prediction = "velocity",
        return_dict: bool = False,
        **conditioning: Any,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Velocity û = ε̂ − x̂_0 (or x̂_0 with prediction="x0") of a noisy image x_t [B,3,H,W] (H, W multiples of
        p) at sigma [B] or scalar in [0,1] (1 = noise); `conditioning`: the family's extra inputs (`_backbone`).

        Returns [B,3,H,W] in fp32 (fp64 if x_t, sigma or the buffers are fp64). The recovery clamp σ_min is 1e-6
        in training mode and `config.sigma_min` in eval mode (spec §3.5).
        """
        tokens, sigma, k, sigma_cal = self._calibrated_tokens(x_t, sigma, prediction)
        p, (batch, _, height, width) = self.config.patch_size, x_t.shape
        grid = (height // p, width // p)
        u_a = self._backbone(k.view(batch, 1, 1) * tokens, sigma_cal, encoder_hidden_states, grid, **conditioning)
        image = self._recovered_image(u_a, tokens, sigma, prediction, height, width)
        return Transformer2DModelOutput(sample=image) if return_dict else image

    def _calibrated_tokens(
        self, x_t: torch.Tensor, sigma: torch.Tensor | float, prediction: Prediction
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked inputs → (tokens x [B,N,D] channel-first, σ [B], k [B], σ̃ [B]), all in the algebra dtype
        (fp32, or fp64 if x_t, sigma or the buffers are fp64)."""
        if prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
        channels, p = self.config.in_channels, self.config.patch_size
        if x_t.ndim != 4 or x_t.shape[1] != channels:
            raise ValueError(f"x_t must be [B,{channels},H,W], got {tuple(x_t.shape)}")
        check_finite(x_t=x_t, sigma=sigma)
        batch = x_t.shape[0]
        sigma = torch.as_tensor(sigma, device=x_t.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or have shape [B]=[{batch}], got {tuple(sigma.shape)}")
        dtype = algebra_dtype(x_t, sigma, self.proj_buffer)
        sigma = sigma.to(dtype)
        tokens = patchify(x_t.to(dtype), p, "channel_first")  # [B,N,D]; checks H, W divisible by p
        k, sigma_cal = calibrate(sigma, self.scale_buffer)
        return tokens, sigma, k, sigma_cal

    def _recovered_image(
        self, u_a: torch.Tensor, tokens: torch.Tensor, sigma: torch.Tensor, prediction: Prediction, height: int,
        width: int,
    ) -> torch.Tensor:
        """û (or x̂_0) [B,C,H,W] from the backbone's û_a and the noisy tokens (spec §3.4); "x0" uses the
        division-free form x̂_0 = s·k·P(x_t − σ·û_a) − s·P⊥û_a."""
        basis, scale = self.proj_buffer, self.scale_buffer
        # validate=False: a non-finite network output must reach the trainer's skip logic, not raise here.
        if prediction == "velocity":
            sigma_min = SIGMA_MIN_TRAIN if self.training else self.config.sigma_min
            out = recover_velocity(u_a, tokens, sigma, basis, scale, sigma_min=sigma_min, validate=False)
        else:
            out = recover_x0(u_a, tokens, sigma, basis, scale, validate=False)
        return unpatchify(out, self.config.patch_size, height, width, "channel_first")

    def _backbone(
        self,
        hidden_states: torch.Tensor,
        sigma_cal: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        grid: tuple[int, int],
        **conditioning: Any,
    ) -> torch.Tensor:
        """û_a = F(y, σ̃) [B,N,D], channel-first tokens: the family's blocks on y = k·x_t [B,N,D] over an h×w
        `grid`, in the model dtype. The only part of the forward under the caller's autocast (spec §3.4a)."""
        raise NotImplementedError

    def run_on_image(self, forward: Callable[..., Any], tokens: torch.Tensor, grid: tuple[int, int],
                     **kwargs: Any) -> torch.Tensor:
        """For backbones that patch the image with their own conv and unpatchify their output themselves (SD3, Sana):
        channel-first pixel tokens [B,N,D] → image → `forward(self, hidden_states=image, **kwargs)` → tokens."""
        p, (h, w) = self.config.patch_size, grid
        image = unpatchify(tokens.to(self.dtype), p, h * p, w * p, "channel_first")
        out = forward(self, hidden_states=image, return_dict=False, **kwargs)[0]
        return patchify(out, p, "channel_first")

    def predict_x0(
        self, x_t: torch.Tensor, sigma: torch.Tensor | float, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """x̂_0 [B,3,H,W] (calls `forward(..., prediction="x0")`, so wrappers' hooks still run)."""
        return self(x_t, sigma, encoder_hidden_states, prediction="x0", **kwargs)
