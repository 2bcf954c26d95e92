"""Latent FLUX.2 transformer → pixel AsymFlow transformer by weight surgery, with a report of every tensor (spec §5.2)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from diffusers import Flux2Transformer2DModel

from asymflow.model import FP32_BUFFERS, AsymFlux2Transformer2DModel
from asymflow.parameterisation import SIGMA_MIN_EVAL_FLUX2, as_scale, check_basis

LatentModel = Flux2Transformer2DModel | str | PathLike

# Written key map of the surgery (spec §5.2), row-vector convention: W_in [inner, r], W_out [r, inner], B [D, r].
SURGERY: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "x_embedder.weight": ("W_in·Bᵀ", lambda w, b: w @ b.T),
    "proj_out.weight": ("B·W_out", lambda w, b: b @ w),
    "proj_out.bias": ("B·b_out", lambda w, b: b @ w),
}


@dataclass
class ConversionReport:
    """Accounting of a conversion: every pixel tensor is copied, re-projected or created; latent leftovers are dropped."""

    copied: list[str] = field(default_factory=list)
    reprojected: dict[str, str] = field(default_factory=dict)  # name -> "rule: latent shape -> pixel shape"
    created: dict[str, str] = field(default_factory=dict)  # name -> what it holds
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"conversion: {len(self.copied)} copied, {len(self.reprojected)} re-projected, "
            f"{len(self.created)} created, {len(self.dropped)} dropped"
        ]
        lines += [f"  re-projected {name}: {how}" for name, how in self.reprojected.items()]
        lines += [f"  created      {name}: {what}" for name, what in self.created.items()]
        lines += [f"  dropped      {name}" for name in self.dropped]
        lines += [f"  copied       {name}" for name in self.copied]
        return "\n".join(lines)


def load_latent_transformer(
    latent_model: LatentModel, torch_dtype: torch.dtype | None = None
) -> tuple[Flux2Transformer2DModel, bool]:
    """The latent model itself, or one loaded from a local diffusers directory / hub id; also says whether we loaded it.

    `torch_dtype` applies only to loading (diffusers loads fp32 unless told otherwise).
    """
    if isinstance(latent_model, Flux2Transformer2DModel):
        return latent_model, False
    if isinstance(latent_model, (str, PathLike)):
        return Flux2Transformer2DModel.from_pretrained(latent_model, torch_dtype=torch_dtype), True
    raise TypeError(f"latent_model must be a Flux2Transformer2DModel or a path, got {type(latent_model).__name__}")


def assemble_pixel_model(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> AsymFlux2Transformer2DModel:
    """Instantiate the pixel class on the meta device and take the given tensors as its storage.

    Skips the random initialisation of a multi-billion-parameter model; `strict=True` makes any missing or
    unexpected tensor an error naming it.
    """
    with torch.device("meta"):
        model = AsymFlux2Transformer2DModel.from_config(dict(config))
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model


def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """B and s are stored in fp32, or fp64 for an fp64 model (DESIGN §2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


Surgery = Mapping[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]


def transfer_tensors(
    expected: Mapping[str, torch.Tensor],
    latent_sd: Mapping[str, torch.Tensor],
    surgery: Surgery,
    basis64: torch.Tensor,
    share: bool,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """The pixel state dict (B and s buffers aside) from the latent one, with the report: tensors named in `surgery`
    are re-projected in fp64 (`product(W, B)`, cast back to W's dtype), all others copied (aliased when `share`).

    `expected` is the pixel model's state dict (meta tensors do): every tensor is shape-checked against it by name;
    a pixel tensor without a latent counterpart, or a surgery tensor without a pixel slot, is an error.
    """
    report = ConversionReport()
    pixel_sd: dict[str, torch.Tensor] = {}
    for name, target in expected.items():
        if name in FP32_BUFFERS:
            continue
        if name not in latent_sd:
            raise ValueError(f"tensor {name} of the pixel model has no counterpart in the latent model")
        tensor = latent_sd[name]
        if name in surgery:
            rule, product = surgery[name]
            new = product(tensor.to(torch.float64), basis64.to(tensor.device)).to(tensor.dtype)
            report.reprojected[name] = f"{rule}: {tuple(tensor.shape)} -> {tuple(new.shape)}"
        else:
            new = tensor if share else tensor.clone()
            report.copied.append(name)
        if new.shape != target.shape:
            raise ValueError(
                f"tensor {name}: latent shape {tuple(tensor.shape)} gives {tuple(new.shape)}, "
                f"pixel model expects {tuple(target.shape)}"
            )
        pixel_sd[name] = new

    unused = [name for name in latent_sd if name not in expected]
    if orphans := [name for name in unused if name in surgery]:
        raise ValueError(f"latent tensors {orphans} must be re-projected but the pixel model has no slot for them")
    report.dropped = unused
    return pixel_sd, report


def subspace_fp64(basis: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and s in fp64 for the surgery (s checked to be a positive scalar)."""
    # contiguous: a QR factor is column-major, and a stride change alters matmul rounding after a save/load.
    basis64 = basis.detach().to(torch.float64).contiguous()
    return basis64, as_scale(scale.detach() if isinstance(scale, torch.Tensor) else scale, torch.float64, basis.device)


def add_subspace_buffers(
    pixel_sd: dict[str, torch.Tensor],
    report: ConversionReport,
    basis64: torch.Tensor,
    scale64: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """proj_buffer ← B, scale_buffer ← s in `dtype` (see `buffer_dtype`), recorded as created in the report."""
    pixel_sd["proj_buffer"] = basis64.to(dtype)
    pixel_sd["scale_buffer"] = scale64.to(dtype)
    report.created["proj_buffer"] = f"basis B {tuple(basis64.shape)} {dtype}"
    report.created["scale_buffer"] = f"scale s = {float(scale64):.6g} {dtype}"


def convert_transformer_with_report(
    latent_model: LatentModel,
    basis: torch.Tensor,
    scale: float | torch.Tensor,
    sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
    share_weights: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> tuple[AsymFlux2Transformer2DModel, ConversionReport]:
    """Pixel model with û_a = B·G(Bᵀ·k·x_t, kσ) at init (spec §5.3), plus the report of the surgery.

    Surgery in fp64: x_embedder.weight ← W_in·Bᵀ, proj_out.weight ← B·W_out (bias ← B·b_out if any);
    proj_buffer ← B, scale_buffer ← s; all other tensors copied. Tensors keep the latent model's dtype; B and s
    are fp32 (fp64 for an fp64 model). `share_weights=True` lets copied tensors alias the latent model's storage
    (saves a model's worth of memory when the latent model stays a frozen teacher); a model loaded here from a
    path (in `torch_dtype`) is never shared with anyone, so it is not cloned. The report is also kept as
    `model.conversion_report`.
    """
    latent, owned = load_latent_transformer(latent_model, torch_dtype)
    config = AsymFlux2Transformer2DModel.from_latent_config(latent.config, sigma_min=sigma_min)
    dim = config["in_channels"] * config["patch_size"] ** 2
    check_basis(basis, dim=dim, rank=config["base_rank"])
    basis64, scale64 = subspace_fp64(basis, scale)

    with torch.device("meta"):
        expected = AsymFlux2Transformer2DModel.from_config(config).state_dict()
    pixel_sd, report = transfer_tensors(expected, latent.state_dict(), SURGERY, basis64, share_weights or owned)
    add_subspace_buffers(pixel_sd, report, basis64, scale64, buffer_dtype(latent.dtype))

    model = assemble_pixel_model(config, pixel_sd)
    model.train(latent.training)
    model.conversion_report = report
    return model, report


def convert_transformer(
    latent_model: LatentModel,
    basis: torch.Tensor,
    scale: float | torch.Tensor,
    sigma_min: float = SIGMA_MIN_EVAL_FLUX2,
    share_weights: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> AsymFlux2Transformer2DModel:
    """`convert_transformer_with_report` returning only the model; the report is kept as `model.conversion_report`."""
    return convert_transformer_with_report(latent_model, basis, scale, sigma_min, share_weights, torch_dtype)[0]
